"""``writeturn doctor``: check a database and say, at a glance, what is wrong and how to fix it.

:func:`diagnose` returns a list of :class:`Check` results, each ``OK``,
``WARN`` or ``FAIL`` with an explanation and, for a problem, the fix:

* every database: the SQLAlchemy and driver versions, the library's migration
  revision against the head of its scripts, and whether the write journal
  table exists. An unmigrated database or a missing journal table is a
  ``WARN``, not a ``FAIL``: plain writes work without them, only journaled
  writes and idempotency keys need the table;
* SQLite: the file itself, the SQLite library version (3.35+ for
  ``RETURNING``), ``journal_mode`` (WAL expected), ``synchronous`` and
  ``busy_timeout`` of a fresh connection, and a leftover (hot) rollback journal;
* Postgres: the server version, connections in use, the
  ``idle_in_transaction_session_timeout`` setting, the advisory locks held in
  the database (the migration lock, the write locks of the keys asked about,
  and any lock whose holder sits idle) and sessions idle in a transaction.

Write lock ids are hashes of (namespace, key), so a lock cannot be named by
its key unless that key is given (``--key``); others show their numeric id.
A holder that sits idle (or idle in a transaction) while holding an advisory
lock for longer than the idle threshold is reported as a leaked lock
(``FAIL``); below the threshold it is a ``WARN``. A lock held by a running
statement is not leaked: it is reported, and is a ``WARN`` only when its
transaction has run longer than the threshold.

The doctor only reads. On SQLite, opening a database whose writer crashed
mid-transaction makes SQLite roll back the hot journal, as any reader would.
A password in the URL is never printed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from sqlalchemy import TextClause, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._engines import unpooled_engine
from .._options import is_seconds
from ..dialects import lock_id, migration_lock_id
from ..errors import ConfigurationError, WriteturnError
from ..journal import TABLE as JOURNAL_TABLE
from ..migrations import DEFAULT_NAMESPACE, current_async, history
from ..schema import VERSION_TABLE
from ..urls import Backend, backend_of, describe_error, normalize_url, redact

__all__ = [
    "Check",
    "Status",
    "DEFAULT_IDLE_THRESHOLD",
    "statement_kind",
    "diagnose",
    "format_text",
    "format_json",
]

Status = Literal["OK", "WARN", "FAIL"]

#: Seconds a lock holder or a transaction may sit idle before it counts as leaked.
DEFAULT_IDLE_THRESHOLD = 60.0
APPLICATION_NAME = "writeturn-doctor"
CONNECT_TIMEOUT = 10.0
STATEMENT_TIMEOUT_MS = 10_000
SQLITE_MIN_VERSION = (3, 35, 0)  # RETURNING
PG_MIN_VERSION_NUM = 100_000  # txid_status, which resolves a COMMIT cut off by a lost connection
SUGGESTED_IDLE_TX_TIMEOUT = "5min"
CONNECTIONS_WARN_SHARE = 0.9
#: The first 8 bytes of a SQLite rollback journal whose header is live.
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
SQLITE_SYNCHRONOUS_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
_QUERY_SHOWN = 200
_IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


# --------------------------------------------------------------------------- SQL
# Every statement the doctor sends (the migration revision is read by
# writeturn.migrations.current_async).

SQL_SQLITE_VERSION = text("SELECT sqlite_version()")
SQL_SQLITE_JOURNAL_MODE = text("PRAGMA journal_mode")
SQL_SQLITE_SYNCHRONOUS = text("PRAGMA synchronous")
SQL_SQLITE_BUSY_TIMEOUT = text("PRAGMA busy_timeout")
SQL_SQLITE_HAS_TABLE = text("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = :t")

SQL_PG_SERVER_VERSION = text(
    "SELECT current_setting('server_version'), "
    "CAST(current_setting('server_version_num') AS integer)"
)
SQL_PG_CONNECTIONS = text(
    "SELECT CAST(current_setting('max_connections') AS integer), "
    "CAST(current_setting('superuser_reserved_connections') AS integer), "
    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), "
    "(SELECT count(*) FROM pg_stat_activity "
    " WHERE backend_type = 'client backend' AND datname = current_database())"
)
SQL_PG_IDLE_TX_TIMEOUT = text(
    "SELECT current_setting('idle_in_transaction_session_timeout'), "
    "(SELECT CAST(setting AS bigint) FROM pg_settings "
    " WHERE name = 'idle_in_transaction_session_timeout'), "
    "current_database()"
)
SQL_PG_ROLE = text(
    "SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names'), "
    "current_setting('synchronous_commit')"
)
# Non-superusers without pg_read_all_stats see the rows, not every column: a
# missing sync_state reads as unknown.
SQL_PG_STANDBYS = text(
    "SELECT coalesce(application_name, ''), coalesce(sync_state, '') FROM pg_stat_replication"
)
SQL_PG_HAS_TABLE = text("SELECT to_regclass(CAST(:t AS text)) IS NOT NULL")
# An advisory lock on one bigint key shows in pg_locks as classid (high 32
# bits), objid (low 32 bits) and objsubid 1; on two int keys, objsubid 2.
SQL_PG_ADVISORY_LOCKS = text(
    "SELECT l.pid, l.classid, l.objid, l.objsubid, l.granted, "
    "a.application_name, a.state, a.query, "
    "CAST(EXTRACT(EPOCH FROM clock_timestamp() - a.state_change) AS float8), "
    "CAST(EXTRACT(EPOCH FROM clock_timestamp() - a.xact_start) AS float8) "
    "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.pid IS DISTINCT FROM pg_backend_pid() "
    "ORDER BY l.granted DESC, l.pid"
)
SQL_PG_IDLE_IN_TRANSACTION = text(
    "SELECT pid, application_name, state, query, "
    "CAST(EXTRACT(EPOCH FROM clock_timestamp() - state_change) AS float8), "
    "CAST(EXTRACT(EPOCH FROM clock_timestamp() - xact_start) AS float8) "
    "FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND state IN ('idle in transaction', 'idle in transaction (aborted)') "
    "ORDER BY state_change"
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Check:
    """The result of one check: what was found (``detail``) and, for a problem, the ``fix``."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


def _ok(name: str, detail: str) -> Check:
    return Check(name, "OK", detail)


@dataclass(frozen=True, slots=True)
class _Options:
    namespace: str
    keys: tuple[str, ...]
    idle_threshold: float
    show_queries: bool = False

    @classmethod
    def checked(
        cls, namespace: str, keys: Iterable[str], idle_threshold: float, show_queries: bool
    ) -> _Options:
        if not isinstance(namespace, str) or not namespace:
            raise ConfigurationError(f"namespace must be a non-empty string, not {namespace!r}")
        if isinstance(keys, str | bytes):
            raise ConfigurationError(
                f"keys must be a collection of key strings, not the single string {keys!r}; "
                f"use keys=[{keys!r}]"
            )
        key_tuple = tuple(keys)
        bad = [k for k in key_tuple if not isinstance(k, str)]
        if bad:
            raise ConfigurationError(f"keys must be strings, not {bad[0]!r}")
        if not is_seconds(idle_threshold, allow_zero=True):
            raise ConfigurationError(
                f"idle_threshold must be a non-negative number of seconds, not {idle_threshold!r}"
            )
        return cls(
            namespace, tuple(dict.fromkeys(key_tuple)), float(idle_threshold), bool(show_queries)
        )


@dataclass(frozen=True, slots=True)
class _Context:
    url: URL
    engine: AsyncEngine
    options: _Options
    sqlite_path: Path | None


_CheckFn = Callable[[AsyncConnection, _Context], Awaitable[list[Check]]]


# --------------------------------------------------------------------------- helpers


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.1f}s"
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}min"
    return f"{value / 3600:.1f}h"


def _query_text(query: str | None, show: bool) -> str:
    """Another session's statement: its kind only (SELECT, INSERT, ...) unless ``show``,
    since its text may carry literals (tokens, personal data) an operator should not see."""
    if query is None:
        return "(not visible to the doctor's role: grant it pg_read_all_stats)"
    if not show:
        return f"{statement_kind(query)} (text hidden; --show-queries shows it)"
    flat = " ".join(query.split())
    return flat if len(flat) <= _QUERY_SHOWN else flat[: _QUERY_SHOWN - 3] + "..."


_LEADING_NOISE = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.S)
_FIRST_WORD = re.compile(r"[A-Za-z]+")


def statement_kind(query: str) -> str:
    """The first keyword of ``query`` (``SELECT``, ``INSERT``, ...), past comments and
    parentheses; ``(empty)`` or ``(unknown)`` when there is none."""
    rest = _LEADING_NOISE.sub("", query, count=1)
    if not rest:
        return "(empty)"
    word = _FIRST_WORD.match(rest)
    return word.group(0).upper()[:20] if word else "(unknown)"


def _app(name: str | None) -> str:
    return repr(name) if name else "(none)"


def _migrate_command(url: URL) -> str:
    return f"writeturn migrate upgrade --url {shlex.quote(redact(url))}"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _signed64(high: int, low: int) -> int:
    unsigned = ((high & 0xFFFFFFFF) << 32) | (low & 0xFFFFFFFF)
    return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------- every database


def _check_drivers(backend: Backend) -> Check:
    driver = "aiosqlite" if backend == "sqlite" else "asyncpg"
    versions = ", ".join(
        f"{name} {_package_version(name)}" for name in ("SQLAlchemy", driver, "alembic")
    )
    return _ok("drivers", versions)


async def _check_migration(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    revisions = history()
    head = revisions[-1] if revisions else None
    current = await current_async(ctx.engine)
    name, fix = "migration", _migrate_command(ctx.url)
    if current == head:
        return [_ok(name, f"at {current} (head)")]
    if current is None:
        return [
            Check(
                name,
                "WARN",
                f"no writeturn revision (no {VERSION_TABLE} table): the library's migrations "
                f"never ran here; head is {head}",
                fix,
            )
        ]
    if current in revisions:
        behind = len(revisions) - 1 - revisions.index(current)
        return [Check(name, "WARN", f"at {current}, {behind} revision(s) behind head {head}", fix)]
    return [
        Check(
            name,
            "WARN",
            f"at {current}, a revision this writeturn does not know (head here is {head}): "
            "a newer writeturn migrated this database",
            "run the writeturn version that migrated this database, or upgrade writeturn here",
        )
    ]


async def _check_journal_table(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    sql = SQL_SQLITE_HAS_TABLE if conn.dialect.name == "sqlite" else SQL_PG_HAS_TABLE
    exists = bool((await conn.execute(sql, {"t": JOURNAL_TABLE})).scalar())
    await conn.rollback()
    if exists:
        return [_ok("journal table", f"{JOURNAL_TABLE} exists")]
    return [
        Check(
            "journal table",
            "WARN",
            f"{JOURNAL_TABLE} does not exist: journaled writes (journal=True) and writes with "
            "an idempotency key fail with JournalMissing; plain writes work",
            _migrate_command(ctx.url),
        )
    ]


# --------------------------------------------------------------------------- SQLite


def _sqlite_path(url: URL) -> Path:
    database = url.database or ""
    if database.startswith("file:"):
        database = unquote(urlsplit(database).path)
    return Path(database)


def _check_sqlite_file(path: Path, url: URL) -> Check:
    name, shown = "database file", str(path.absolute())
    if not path.exists():
        return Check(
            name,
            "FAIL",
            f"SQLite database file {shown} does not exist (the doctor does not create it)",
            f"fix the path in the URL (a relative path is relative to the working directory, "
            f"{Path.cwd()}), or create the database with {_migrate_command(url)}",
        )
    if not path.is_file():
        return Check(
            name,
            "FAIL",
            f"{shown} is not a file",
            "point the URL at the SQLite database file",
        )
    directory = path.absolute().parent
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(directory, os.W_OK | os.X_OK):
        return Check(
            name,
            "WARN",
            f"{shown} exists, but this user cannot write the file or its directory {directory}: "
            "SQLite creates its -wal, -shm and -journal files next to the database",
            "give the service's user write access to the file and its directory",
        )
    return _ok(name, f"{shown} ({path.stat().st_size} bytes)")


def _journal_state(path: Path) -> Literal["absent", "live", "inactive"]:
    journal = path.with_name(path.name + "-journal")
    try:
        with journal.open("rb") as f:
            header = f.read(len(JOURNAL_MAGIC))
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "live"  # cannot read it: assume the worst
    return "live" if header == JOURNAL_MAGIC else "inactive"


def _check_rollback_journal(path: Path, before: str) -> Check:
    name, journal = "rollback journal", f"{path.absolute()}-journal"
    after = _journal_state(path)
    if after == "live":
        return Check(
            name,
            "WARN",
            f"{journal} has a live header: a write transaction is in progress, or a writer "
            "crashed mid-transaction (a hot journal) and this process could not roll it back",
            "never delete the -journal file by hand (that corrupts the database); open the "
            "database once with write access to the file and its directory, and SQLite rolls "
            "the crashed transaction back",
        )
    if before == "live":
        return Check(
            name,
            "WARN",
            f"{journal} had a live header when the doctor started and is gone now: a write "
            "finished, or a writer had crashed mid-transaction (a hot journal) and SQLite "
            "rolled that transaction back when the doctor opened the database",
            "nothing to repair in the file; if writers crash, find out why (killed processes, "
            "a full disk); WAL (PRAGMA journal_mode=WAL) uses no rollback journal",
        )
    if after == "inactive":
        return _ok(name, f"{journal} exists without a live header (harmless leftover)")
    return _ok(name, "no rollback journal left over")


async def _scalar(conn: AsyncConnection, sql: TextClause) -> Any:
    value = (await conn.execute(sql)).scalar()
    await conn.rollback()
    return value


async def _check_sqlite_version(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    version = str(await _scalar(conn, SQL_SQLITE_VERSION))
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    needed = ".".join(map(str, SQLITE_MIN_VERSION))
    if parts < SQLITE_MIN_VERSION:
        return [
            Check(
                "sqlite version",
                "FAIL",
                f"SQLite library {version}; writeturn needs {needed}+ (RETURNING)",
                f"run on a Python whose sqlite3 module is linked against SQLite {needed} or newer",
            )
        ]
    return [_ok("sqlite version", f"SQLite library {version}")]


async def _check_journal_mode(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    mode = str(await _scalar(conn, SQL_SQLITE_JOURNAL_MODE)).lower()
    if mode == "wal":
        return [_ok("journal mode", "journal_mode=wal")]
    return [
        Check(
            "journal mode",
            "WARN",
            f"journal_mode={mode}, not wal: readers and the writer block each other",
            "run PRAGMA journal_mode=WAL once on the file (it persists), or open the database "
            "with WriteSerializer.from_url, which sets it",
        )
    ]


async def _check_synchronous(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    value = int(await _scalar(conn, SQL_SQLITE_SYNCHRONOUS))
    level = SQLITE_SYNCHRONOUS_NAMES.get(value, str(value))
    detail = (
        f"synchronous={level} on a fresh connection (a per-connection setting; "
        "WriteSerializer.from_url sets NORMAL unless sqlite_synchronous says otherwise)"
    )
    if level == "OFF":
        return [
            Check(
                "synchronous",
                "WARN",
                detail + ": OFF can corrupt the database on a crash or power loss",
                "use synchronous=NORMAL (with WAL) or FULL",
            )
        ]
    return [_ok("synchronous", detail)]


async def _check_busy_timeout(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    millis = int(await _scalar(conn, SQL_SQLITE_BUSY_TIMEOUT))
    return [
        _ok(
            "busy timeout",
            f"busy_timeout={millis} ms on a fresh connection (a per-connection setting; "
            "WriteSerializer.from_url sets sqlite_busy_timeout, 5 s by default)",
        )
    ]


SQLITE_CHECKS: tuple[tuple[str, _CheckFn], ...] = (
    ("sqlite version", _check_sqlite_version),
    ("journal mode", _check_journal_mode),
    ("synchronous", _check_synchronous),
    ("busy timeout", _check_busy_timeout),
    ("migration", _check_migration),
    ("journal table", _check_journal_table),
)


# --------------------------------------------------------------------------- Postgres


async def _check_pg_version(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    row = (await conn.execute(SQL_PG_SERVER_VERSION)).one()
    await conn.rollback()
    version, number = str(row[0]), int(row[1])
    if number < PG_MIN_VERSION_NUM:
        return [
            Check(
                "server version",
                "WARN",
                f"PostgreSQL {version}: before 10, writeturn cannot learn the outcome of a "
                "write whose COMMIT was cut off (txid_status), so it reports it as unknown",
                "upgrade PostgreSQL to a supported version",
            )
        ]
    return [_ok("server version", f"PostgreSQL {version}")]


async def _check_pg_connections(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    row = (await conn.execute(SQL_PG_CONNECTIONS)).one()
    await conn.rollback()
    max_conn, reserved, used, here = (int(v) for v in row)
    usable = max(1, max_conn - reserved)
    detail = (
        f"{used} of max_connections={max_conn} in use ({reserved} reserved for superusers), "
        f"{here} to this database"
    )
    if used >= CONNECTIONS_WARN_SHARE * usable:
        return [
            Check(
                "connections",
                "WARN",
                detail + ": new connections will soon be refused",
                "use smaller connection pools or a connection pooler, or raise max_connections",
            )
        ]
    return [_ok("connections", detail)]


async def _check_pg_idle_tx_timeout(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    row = (await conn.execute(SQL_PG_IDLE_TX_TIMEOUT)).one()
    await conn.rollback()
    shown, millis, database = str(row[0]), int(row[1] or 0), str(row[2])
    name = "idle_in_transaction_session_timeout"
    if millis == 0:
        return [
            Check(
                name,
                "WARN",
                "0 (disabled): a session that leaves a transaction open keeps its snapshot "
                "and locks, advisory locks included, until someone ends it",
                f"ALTER DATABASE {_quote_ident(database)} SET {name} = "
                f"'{SUGGESTED_IDLE_TX_TIMEOUT}' (new sessions get it), or set it in "
                "postgresql.conf or per role",
            )
        ]
    return [_ok(name, shown)]


#: synchronous_commit levels at which COMMIT waits for a synchronous standby.
_WAITS_FOR_STANDBY = ("on", "remote_write", "remote_apply")


async def _check_pg_replication(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    """The server's role, its standbys, and whether a COMMITTED write survives a failover."""
    in_recovery, names, commit_level = (await conn.execute(SQL_PG_ROLE)).one()
    if in_recovery:
        await conn.rollback()
        return [
            Check(
                "replication",
                "FAIL",
                "this server is a standby (in recovery): it takes no writes",
                "point writeturn at the primary, or name every host in the URL with "
                "target_session_attrs=read-write (postgresql://app@db1:5432,db2:5432/app"
                "?target_session_attrs=read-write) so that connections find the primary",
            )
        ]
    standbys = [(str(a), str(b)) for a, b in (await conn.execute(SQL_PG_STANDBYS)).all()]
    await conn.rollback()
    synchronous = [a for a, state in standbys if state in ("sync", "quorum")]
    unknown = [a for a, state in standbys if not state]
    named = bool(str(names).strip())  # synchronous_standby_names is set
    waits = named and commit_level in _WAITS_FOR_STANDBY
    listed = ", ".join(a or "?" for a, _ in standbys)
    if not standbys:
        if waits:
            return [
                Check(
                    "replication",
                    "FAIL",
                    f"synchronous_standby_names = {names!r} but no standby is connected: "
                    "every COMMIT waits until one is",
                    "start the standby, or clear synchronous_standby_names",
                )
            ]
        return [
            _ok(
                "replication",
                "primary, no streaming standby: nothing to fail over to, nothing lost by one",
            )
        ]
    if waits and synchronous:
        return [
            _ok(
                "replication",
                f"primary with {len(standbys)} standby(s) ({listed}), {len(synchronous)} "
                f"synchronous, synchronous_commit = {commit_level}: a write reported "
                "COMMITTED is on a synchronous standby too, and survives its promotion",
            )
        ]
    if unknown and waits:
        return [
            _ok(
                "replication",
                f"primary with {len(standbys)} standby(s) ({listed}); synchronous_standby_names "
                f"= {names!r}, synchronous_commit = {commit_level} (this role cannot see "
                "which standby is synchronous: grant it pg_read_all_stats to check)",
            )
        ]
    why = (
        f"synchronous_commit = {commit_level}: COMMIT does not wait for a standby"
        if named
        else "asynchronous (synchronous_standby_names is empty)"
    )
    return [
        Check(
            "replication",
            "WARN",
            f"primary with {len(standbys)} standby(s) ({listed}), {why}: a write reported "
            "COMMITTED may not have reached a standby, and is lost if that standby is "
            "promoted (a failover)",
            "set synchronous_standby_names (e.g. 'ANY 1 (*)') and synchronous_commit = on, "
            "so that COMMIT returns once a standby has the write; or accept that a failover "
            "can lose the last acknowledged writes",
        )
    ]


@dataclass(frozen=True, slots=True)
class _AdvisoryLock:
    pid: int | None
    key: int | tuple[int, int]
    granted: bool
    application: str | None
    state: str | None
    query: str | None
    state_age: float | None
    xact_age: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> _AdvisoryLock:
        pid, classid, objid, objsubid, granted, app, state, query, state_age, xact_age = row
        key: int | tuple[int, int] = (
            _signed64(int(classid), int(objid)) if objsubid == 1 else (int(classid), int(objid))
        )
        return cls(pid, key, bool(granted), app, state, query, state_age, xact_age)

    def holder(self) -> str:
        if self.pid is None:
            return "a prepared transaction (see pg_prepared_xacts)"
        return f"pid {self.pid} (application {_app(self.application)}, state {self.state})"

    def idle_for(self) -> float | None:
        """Seconds the holder has sat idle holding the lock, or None if it is not idle."""
        if self.state == "idle" or self.state in _IDLE_IN_TRANSACTION:
            return self.state_age
        return None


def _lock_names(options: _Options) -> dict[int, str]:
    """Name the locks the doctor can recognise: the migration lock and the given keys' locks."""
    ns = options.namespace
    names = {
        key: f"the write lock of key {k!r} (namespace {ns!r}, lock id {key})"
        for k in options.keys
        for key in (lock_id(ns, k),)
    }
    migration = migration_lock_id(ns, VERSION_TABLE)
    names[migration] = f"the migration lock (namespace {ns!r}, lock id {migration})"
    return names


def _lock_label(key: int | tuple[int, int], names: Mapping[int, str]) -> str:
    if isinstance(key, tuple):
        return f"advisory lock on the int pair {key}"
    return names.get(key, f"advisory lock {key}")


def _waiters(key: int | tuple[int, int], locks: Sequence[_AdvisoryLock]) -> str:
    pids = [str(w.pid) for w in locks if not w.granted and w.key == key]
    return f"; {len(pids)} session(s) wait for it (pid {', '.join(pids)})" if pids else ""


def _judge_idle_holder(
    name: str, lock: _AdvisoryLock, label: str, waiting: str, idle: float, options: _Options
) -> Check:
    """A lock whose holder sits idle: leaked beyond the threshold, a warning below it."""
    detail = (
        f"{label} is held by {lock.holder()}, idle for {_seconds(idle)} while holding it"
        f"{waiting}; last query: {_query_text(lock.query, options.show_queries)}"
    )
    threshold = options.idle_threshold
    if lock.state == "idle":  # only a session-level lock outlives its transaction
        cause = (
            "fix the holder so it releases the lock (pg_advisory_unlock), or make it take "
            "pg_advisory_xact_lock, which ends with the transaction"
        )
    else:
        cause = "make the holder commit or roll back promptly; a lock lives as long as that"
    fix = f"{cause}; to release it now: SELECT pg_terminate_backend({lock.pid})"
    if idle > threshold:
        return Check(name, "FAIL", f"leaked advisory lock: {detail}", fix)
    return Check(name, "WARN", f"{detail} (leaked if still idle after {_seconds(threshold)})", fix)


def _judge_lock(
    name: str, lock: _AdvisoryLock, label: str, locks: Sequence[_AdvisoryLock], options: _Options
) -> Check:
    """Rate one held lock: leaked (idle beyond the threshold), suspicious, or fine."""
    waiting = _waiters(lock.key, locks)
    if lock.pid is None:
        return Check(
            name,
            "WARN",
            f"{label} is held by a prepared transaction{waiting}",
            "COMMIT PREPARED or ROLLBACK PREPARED it (see pg_prepared_xacts)",
        )
    idle = lock.idle_for()
    if idle is not None:
        return _judge_idle_holder(name, lock, label, waiting, idle, options)
    if lock.state is None:
        return Check(
            name,
            "WARN",
            f"{label} is held by pid {lock.pid}, whose activity the doctor's role cannot see"
            f"{waiting}",
            "run the doctor as a role with pg_read_all_stats (or a superuser) to see the holder",
        )
    query = _query_text(lock.query, options.show_queries)
    detail = f"{label} is held by {lock.holder()}{waiting}; query: {query}"
    running = lock.xact_age
    threshold = options.idle_threshold
    if running is not None and running > threshold:
        return Check(
            name,
            "WARN",
            f"{detail}; its transaction has run for {_seconds(running)}",
            "let it finish if it is a long migration or write; if it is stuck: "
            f"SELECT pg_terminate_backend({lock.pid})",
        )
    return _ok(name, detail)


def _locks_inventory(locks: Sequence[_AdvisoryLock], problems: int, threshold: float) -> Check:
    if not locks:
        return _ok("advisory locks", "none held in this database")
    held = [lk for lk in locks if lk.granted]
    detail = (
        f"{len(held)} held in this database by {len({lk.pid for lk in held})} session(s), "
        f"{len(locks) - len(held)} waiting"
    )
    if problems:
        return _ok("advisory locks", f"{detail}; {problems} problem(s) reported on their own lines")
    return _ok("advisory locks", f"{detail}; none idle longer than {_seconds(threshold)}")


async def _check_pg_locks(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    rows = (await conn.execute(SQL_PG_ADVISORY_LOCKS)).all()
    await conn.rollback()
    locks = [_AdvisoryLock.from_row(tuple(row)) for row in rows]
    options, names = ctx.options, _lock_names(ctx.options)
    threshold = options.idle_threshold
    named: list[tuple[str, int]] = [
        ("migration lock", migration_lock_id(options.namespace, VERSION_TABLE))
    ]
    named += [(f"write lock {k!r}", lock_id(options.namespace, k)) for k in options.keys]
    checks: list[Check] = []
    for name, key in named:
        holders = [lk for lk in locks if lk.granted and lk.key == key]
        label = _lock_label(key, names)
        if not holders:
            checks.append(_ok(name, f"{label} is free{_waiters(key, locks)}"))
        checks += [_judge_lock(name, lk, label, locks, options) for lk in holders]
    named_keys = {key for _, key in named}
    others = [
        _judge_lock(f"advisory lock {lk.key}", lk, _lock_label(lk.key, names), locks, options)
        for lk in locks
        if lk.granted and lk.key not in named_keys
    ]
    checks += [c for c in others if c.status != "OK"]  # fine locks only count in the inventory
    problems = sum(c.status != "OK" for c in checks)
    return [_locks_inventory(locks, problems, threshold), *checks]


def _judge_idle_session(row: Sequence[Any], options: _Options) -> Check:
    pid, app, state, query, idle_age, xact_age = row
    idle = float(idle_age or 0.0)
    threshold = options.idle_threshold
    over = idle > threshold
    detail = (
        f"pid {pid} (application {_app(app)}) is {state} for {_seconds(idle)}"
        f"{f' (longer than {_seconds(threshold)})' if over else ''}, its transaction open for "
        f"{_seconds(float(xact_age or idle))}; "
        f"last query: {_query_text(query, options.show_queries)}"
    )
    fix = (
        "make the application commit or roll back promptly (no slow awaits inside a "
        "transaction); set idle_in_transaction_session_timeout so Postgres ends such sessions; "
        f"to end this one now: SELECT pg_terminate_backend({pid})"
    )
    return Check(f"idle in transaction (pid {pid})", "FAIL" if over else "WARN", detail, fix)


async def _check_pg_idle_sessions(conn: AsyncConnection, ctx: _Context) -> list[Check]:
    rows = (await conn.execute(SQL_PG_IDLE_IN_TRANSACTION)).all()
    await conn.rollback()
    if not rows:
        return [_ok("idle in transaction", "no session of this database is idle in a transaction")]
    return [_judge_idle_session(tuple(row), ctx.options) for row in rows]


POSTGRES_CHECKS: tuple[tuple[str, _CheckFn], ...] = (
    ("server version", _check_pg_version),
    ("replication", _check_pg_replication),
    ("connections", _check_pg_connections),
    ("idle_in_transaction_session_timeout", _check_pg_idle_tx_timeout),
    ("advisory locks", _check_pg_locks),
    ("idle in transaction", _check_pg_idle_sessions),
    ("migration", _check_migration),
    ("journal table", _check_journal_table),
)


# --------------------------------------------------------------------------- running


def _engine(url: URL) -> AsyncEngine:
    connect_args = {
        "timeout": CONNECT_TIMEOUT,
        "server_settings": {
            "application_name": APPLICATION_NAME,
            "statement_timeout": str(STATEMENT_TIMEOUT_MS),
        },
    }
    return unpooled_engine(url, connect_args)


async def _run_check(
    conn: AsyncConnection, ctx: _Context, name: str, check: _CheckFn
) -> list[Check]:
    """Run one check; if it fails to run, say so as a FAIL and go on with the next."""
    try:
        return await check(conn, ctx)
    except (DBAPIError, OSError, WriteturnError) as exc:
        with contextlib.suppress(Exception):
            await conn.rollback()
        return [
            Check(
                name,
                "FAIL",
                f"the check could not run: {describe_error(exc, ctx.url)}",
                "see the error: the database may be damaged, or the doctor's user lacks rights",
            )
        ]


async def _run_connected(ctx: _Context, checks: Sequence[tuple[str, _CheckFn]]) -> list[Check]:
    try:
        conn = await ctx.engine.connect()
    except (DBAPIError, OSError) as exc:
        return [
            Check(
                "connection",
                "FAIL",
                f"database unreachable: cannot connect to {redact(ctx.url)}: "
                f"{describe_error(exc, ctx.url)}",
                "check that the server runs and accepts connections, and that the host, port, "
                "database name, user and password in the URL are right",
            )
        ]
    results = [_ok("connection", f"connected to {redact(ctx.url)}")]
    try:
        for name, check in checks:
            results += await _run_check(conn, ctx, name, check)
    finally:
        await conn.close()
    return results


async def _diagnose_sqlite(ctx: _Context) -> list[Check]:
    path = ctx.sqlite_path
    assert path is not None
    file_check = _check_sqlite_file(path, ctx.url)
    if file_check.status == "FAIL":
        return [file_check]  # connecting would create an empty database file
    journal_before = _journal_state(path)
    results = [file_check, *await _run_connected(ctx, SQLITE_CHECKS)]
    return [*results, _check_rollback_journal(path, journal_before)]


async def diagnose(
    url: str | URL,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    keys: Iterable[str] = (),
    idle_threshold: float = DEFAULT_IDLE_THRESHOLD,
    show_queries: bool = False,
) -> list[Check]:
    """Check the database at ``url``; return one :class:`Check` per finding.

    ``namespace`` is the serializer's namespace (it names the migration lock
    and the write locks); ``keys`` are write keys whose advisory locks to
    report by name (Postgres); a lock holder idle longer than
    ``idle_threshold`` seconds holds a leaked lock. Other sessions' statements
    are shown by their kind (``SELECT``, ``INSERT``, ...); their text, which may
    carry secrets in its literals, only with ``show_queries``. Raises
    :class:`~writeturn.errors.UnsupportedDatabase` for a URL writeturn does
    not support and :class:`~writeturn.errors.ConfigurationError` for a bad
    option; an unreachable database is a ``FAIL`` check, not an exception.
    """
    normalized = normalize_url(url)
    options = _Options.checked(namespace, keys, idle_threshold, show_queries)
    backend = backend_of(normalized)
    engine = _engine(normalized)
    path = _sqlite_path(normalized) if backend == "sqlite" else None
    ctx = _Context(normalized, engine, options, path)
    try:
        if backend == "sqlite":
            found = await _diagnose_sqlite(ctx)
        else:
            found = await _run_connected(ctx, POSTGRES_CHECKS)
    finally:
        await engine.dispose()
    return [_check_drivers(backend), *found]


# --------------------------------------------------------------------------- rendering


def format_text(url: str | URL, checks: Sequence[Check]) -> str:
    """Render checks as the report the CLI prints: one line per check, then its fix."""
    lines = [f"writeturn doctor: {redact(url)}"]
    for check in checks:
        lines.append(f"{check.status:<5} {check.name}: {check.detail}")
        if check.fix is not None and check.status != "OK":
            lines.append(f"      fix: {check.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in ("FAIL", "WARN", "OK")}
    overall = "FAIL" if counts["FAIL"] else "OK"
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines.append(f"result: {overall} ({summary})")
    return "\n".join(lines)


def format_json(checks: Sequence[Check]) -> str:
    """Render checks as a JSON list of {check, status, detail, fix}."""
    return json.dumps(
        [{"check": c.name, "status": c.status, "detail": c.detail, "fix": c.fix} for c in checks],
        indent=2,
    )
