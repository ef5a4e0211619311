"""Schema migrations for writeturn's own tables, under a lock that admits one migrator at a time.

Three layers:

* :func:`lock` / :func:`lock_async`: the migration lock, also offered for an
  application's own Alembic environment. On Postgres it is a session-level
  advisory lock (``pg_advisory_lock``) on the migration connection; on SQLite
  an exclusive ``flock`` on a lock file next to the database file.
* :func:`upgrade`, :func:`downgrade`, :func:`current`, :func:`history` (and the
  ``*_async`` variants): run the library's Alembic scripts programmatically,
  from a source checkout or an installed wheel.
* :func:`history_lines` and :func:`head_revision`: what ``writeturn migrate`` shows
  (the command itself is ``writeturn.cli.migrate``).

The Alembic environment (``env.py`` of the scripts) serves both the
``alembic`` command and this module; settings travel in
``Config.attributes`` under the ``ATTR_*`` keys below, never as ini text, so a
database password is never written anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._engines import unpooled_engine
from ._error_kinds import ErrorKind, classify
from ._options import is_seconds
from .dialects import migration_lock_id, reached_through_pooler
from .errors import ConfigurationError, DatabaseUnreachable, UnsupportedDatabase, WriteturnError
from .schema import VERSION_TABLE
from .urls import (
    URL_ENV,
    Backend,
    backend_of,
    describe_error,
    normalize_url,
    redact,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_LOCK_TIMEOUT",
    "VERSION_TABLE",
    "URL_ENV",
    "MigrationLockTimeout",
    "MigrationResult",
    "lock_key",
    "lock",
    "lock_async",
    "default_script_location",
    "upgrade",
    "downgrade",
    "current",
    "history",
    "upgrade_async",
    "downgrade_async",
    "current_async",
    "head_revision",
    "history_lines",
]

log = logging.getLogger("writeturn")

DEFAULT_NAMESPACE = "writeturn"
DEFAULT_LOCK_TIMEOUT = 60.0
#: Test-only: seconds env.py sleeps after applying each revision, still inside
#: the locked region and the open transaction, so tests can make runs overlap.
TEST_DELAY_ENV = "WRITETURN_MIGRATION_TEST_DELAY"

# Keys of alembic's Config.attributes that this module and env.py share.
ATTR_CONNECTION = "connection"  # the name Alembic's cookbook uses for a shared connection
ATTR_NAMESPACE = "writeturn.namespace"
ATTR_LOCK_TIMEOUT = "writeturn.lock_timeout"
ATTR_LOCK_HELD = "writeturn.lock_held"
ATTR_STEPS = "writeturn.steps"

_APPLICATION_NAME = "writeturn-migrate"
_POLL_FIRST, _POLL_MAX = 0.005, 0.1


class MigrationLockTimeout(WriteturnError, TimeoutError):
    """The migration lock was not acquired within the lock timeout; nothing was migrated."""


@dataclass(frozen=True)
class MigrationResult:
    """What one upgrade or downgrade did, read while it still held the migration lock."""

    steps: tuple[str, ...]
    """Revisions applied (upgrade) or reverted (downgrade) by this run, in order; empty if none."""
    revision: str | None
    """The database's revision when the run ended; ``None`` means base (no revision)."""


# --------------------------------------------------------------------------- the lock


#: The migration lock's advisory key for (namespace, name), the same in every process;
#: derived beside the write locks' ids, in :mod:`writeturn.dialects`.
lock_key = migration_lock_id


@dataclass(frozen=True)
class _LockName:
    namespace: str
    name: str
    key: int

    @classmethod
    def checked(cls, namespace: str, name: str, timeout: float) -> _LockName:
        if not isinstance(namespace, str) or not namespace:
            raise ConfigurationError(f"namespace must be a non-empty string, not {namespace!r}")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"lock name must be a non-empty string, not {name!r}")
        _check_timeout(timeout)
        return cls(namespace, name, migration_lock_id(namespace, name))

    def describe(self) -> str:
        return f"migration lock (namespace={self.namespace!r}, table={self.name!r}, key={self.key})"


def _check_timeout(timeout: float) -> None:
    if not is_seconds(timeout, allow_zero=False):
        raise ConfigurationError(
            f"lock timeout must be a positive number of seconds, not {timeout!r}"
        )


def _backend_of_connection(connection: Connection | AsyncConnection) -> Backend:
    name = connection.dialect.name
    if name == "postgresql":
        return "postgresql"
    if name == "sqlite":
        return "sqlite"
    raise UnsupportedDatabase(
        f"the migration lock supports Postgres and SQLite, not {name!r} "
        f"(connection to {redact(connection.engine.url)})"
    )


def _invalidate_quietly(connection: Connection) -> None:
    # Closing the session is what surely drops a Postgres session lock.
    with contextlib.suppress(Exception):
        connection.invalidate()


# Postgres ------------------------------------------------------------------

_PG_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_PG_LOCK = text("SELECT pg_advisory_lock(:key)")
_PG_UNLOCK = text("SELECT pg_advisory_unlock(:key)")
_PG_GET_LOCK_TIMEOUT = text("SELECT current_setting('lock_timeout')")
_PG_SET_LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', :value, true)")


def _pg_holders_sql(key: int) -> str:
    # pg_locks shows a bigint advisory key as classid (high 32 bits), objid
    # (low 32 bits) and objsubid 1.
    return (
        "SELECT l.pid, a.application_name, a.client_addr, a.backend_start, a.state "
        "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted "
        f"AND l.classid = {(key >> 32) & 0xFFFFFFFF} AND l.objid = {key & 0xFFFFFFFF} "
        "AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )


def _pg_holders(connection: Connection, lk: _LockName) -> str:
    """Describe who holds the lock, best effort: the timeout message must not fail itself."""
    idle = not connection.in_transaction()
    try:
        rows = connection.exec_driver_sql(_pg_holders_sql(lk.key)).all()
    except Exception:
        return "unknown"
    finally:
        if idle:
            with contextlib.suppress(Exception):
                connection.rollback()
    if not rows:
        return "nobody now (it was just released)"
    return ", ".join(f"pid {row[0]} (application_name={row[1]!r})" for row in rows)


def _pg_acquire(connection: Connection, lk: _LockName, timeout: float) -> None:
    """Take the session-level advisory lock, waiting at most ``timeout`` seconds.

    The wait happens in the server (``lock_timeout``), so waiters queue there
    and an async caller's event loop is not blocked.
    """
    # Wait in a savepoint (inside a caller's transaction) or in a transaction of
    # our own, so a timed-out wait aborts only that. The lock_timeout is set
    # LOCAL and put back, so it never outlives the wait.
    scope = connection.begin_nested() if connection.in_transaction() else connection.begin()
    try:
        with scope:
            _refuse_a_pooler(connection)
            if connection.scalar(_PG_TRY_LOCK, {"key": lk.key}):
                return
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "waiting up to %gs for the %s, held by %s",
                    timeout,
                    lk.describe(),
                    _pg_holders(connection, lk),
                )
            previous = connection.scalar(_PG_GET_LOCK_TIMEOUT)
            millis = max(1, math.ceil(timeout * 1000))
            connection.execute(_PG_SET_LOCK_TIMEOUT, {"value": f"{millis}ms"})
            connection.execute(_PG_LOCK, {"key": lk.key})
            connection.execute(_PG_SET_LOCK_TIMEOUT, {"value": previous})
    except DBAPIError as exc:
        if ErrorKind.LOCK_TIMEOUT not in classify(connection.dialect.name, exc):
            _invalidate_quietly(connection)
            raise
        raise MigrationLockTimeout(
            f"timed out after {timeout:g}s waiting for the {lk.describe()} on "
            f"{redact(connection.engine.url)}; it is held by {_pg_holders(connection, lk)}; "
            f"find the holder with: {_pg_holders_sql(lk.key)}"
        ) from exc
    except BaseException:
        # Interrupted mid-wait: whether the server granted the lock is unknown.
        _invalidate_quietly(connection)
        raise


def _refuse_a_pooler(connection: Connection) -> None:
    """The migration lock is held by a session: refuse a pooler, which shares sessions.

    Behind PgBouncer in transaction mode the server connection that took the
    lock serves other clients after the statement, and the migration's own
    statements may run on another one: the lock would protect nothing.
    Through a pooler the pid the client was given is the pooler's, not the
    backend's, which is how it is recognised (one round trip per migration run).
    """
    backend = connection.scalar(text("SELECT pg_backend_pid()"))
    if reached_through_pooler(connection.connection.driver_connection, backend):
        raise ConfigurationError(
            f"{redact(connection.engine.url)} answers through a connection pooler "
            "(PgBouncer?): the migration lock is a session-level advisory lock, which a "
            "pooler would hand to other clients between statements. Run migrations on a "
            "direct connection to Postgres (the server's own host and port), not through "
            "the pooler"
        )


def _pg_unlock(connection: Connection, lk: _LockName) -> bool:
    idle = not connection.in_transaction()
    released = bool(connection.scalar(_PG_UNLOCK, {"key": lk.key}))
    if idle:
        connection.commit()
    return released


def _pg_release(connection: Connection, lk: _LockName) -> None:
    """Release the advisory lock; if that fails, end the session, which releases it too."""
    try:
        try:
            released = _pg_unlock(connection, lk)
        except DBAPIError:
            if not connection.in_transaction():
                raise
            # A failed Postgres transaction refuses every statement, the unlock included.
            connection.rollback()
            released = _pg_unlock(connection, lk)
    except BaseException as exc:
        log.warning("could not release the %s (%s); closing its connection", lk.describe(), exc)
        _invalidate_quietly(connection)
        if not isinstance(exc, Exception):
            raise
        return
    if not released:
        log.warning("the %s was no longer held when released", lk.describe())


# SQLite --------------------------------------------------------------------


def _sqlite_database_path(connection: Connection) -> Path:
    idle = not connection.in_transaction()
    rows = connection.exec_driver_sql("PRAGMA database_list").all()
    if idle:
        connection.commit()
    for row in rows:
        if row[1] == "main" and row[2]:
            # The real path: two spellings of one file (symlinks) must share one lock file.
            return Path(row[2]).resolve()
    raise ConfigurationError(
        f"the migration lock needs a SQLite database file; {redact(connection.engine.url)} "
        "is in memory or temporary"
    )


def _sqlite_lock_path(database: Path, lk: _LockName) -> Path:
    # One file per (namespace, name), like one advisory key on Postgres; the
    # key in hex keeps arbitrary namespace text out of the file name.
    return database.with_name(f"{database.name}.migrate-{lk.key & 0xFFFFFFFFFFFFFFFF:016x}.lock")


class _FileLock:
    """An exclusive ``flock`` on a lock file beside the database.

    ``flock`` excludes every other open of the file, in other processes and in
    this one, and the kernel drops it when the holder's process dies, so a
    killed migrator never leaves a stale lock. The file itself stays: deleting
    a lock file races with processes about to lock it. Needs local file
    locking (not reliable on some network file systems).
    """

    def __init__(self, path: Path, lk: _LockName, database: Path) -> None:
        self.path, self.lk, self.database = path, lk, database
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        import fcntl  # POSIX only: imported here so the rest of the module imports anywhere

        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # Tell the next waiter who holds it (cleared at release).
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def waits(self, timeout: float) -> Iterator[float]:
        """Yield sleep durations until the lock is taken; raise at the deadline."""
        deadline = time.monotonic() + timeout
        delay = _POLL_FIRST
        while not self.try_acquire():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise MigrationLockTimeout(
                    f"timed out after {timeout:g}s waiting for the {self.lk.describe()} on "
                    f"SQLite database {self.database}: lock file {self.path} is held "
                    f"{self._holder()}; find the holder with `fuser -v {self.path}` "
                    f"or `lsof {self.path}`"
                )
            if delay == _POLL_FIRST:
                log.info("waiting up to %gs for the %s", timeout, self.lk.describe())
            yield min(delay, remaining)
            delay = min(delay * 2, _POLL_MAX)

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"by pid {pid} (as recorded in the file)" if pid.isdigit() else "by another process"

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self.close()

    def close(self) -> None:
        # Closing the descriptor also drops the flock.
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _sqlite_file_lock(connection: Connection, lk: _LockName) -> _FileLock:
    database = _sqlite_database_path(connection)
    return _FileLock(_sqlite_lock_path(database, lk), lk, database)


def _begin_lock(connection: Connection, lk: _LockName, timeout: float) -> _FileLock | None:
    """What :func:`lock` and :func:`lock_async` share, before the wait that differs.

    Postgres: take the advisory lock (the server does the waiting) and return
    None. SQLite: return the lock file, not yet locked; the caller waits for it
    with ``waits``, sleeping as it can, inside :func:`_closed_if_not_taken`.
    """
    if _backend_of_connection(connection) == "postgresql":
        _pg_acquire(connection, lk, timeout)
        return None
    return _sqlite_file_lock(connection, lk)


@contextlib.contextmanager
def _closed_if_not_taken(file_lock: _FileLock) -> Iterator[None]:
    """Close the lock file if the wait for it ends in an error (a timeout, a cancellation)."""
    try:
        yield
    except BaseException:
        file_lock.close()
        raise


# Public context managers ---------------------------------------------------


@contextlib.contextmanager
def lock(
    connection: Connection,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    name: str = "alembic_version",
    timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Iterator[None]:
    """Hold the migration lock for (namespace, name) so that one migrator at a time runs.

    ``connection`` is a SQLAlchemy sync :class:`~sqlalchemy.engine.Connection`,
    such as the one ``env.py`` gets inside ``run_sync``; it must stay open for
    the whole block. Waits at most ``timeout`` seconds, then raises
    :class:`MigrationLockTimeout` naming the lock and how to find its holder.
    ``name`` is conventionally the version table the lock guards; writeturn's
    own runs use ``namespace="writeturn", name="writeturn_alembic_version"``,
    so an application's lock on its own version table never waits for them.

    Postgres: a session-level ``pg_advisory_lock`` on ``connection``, so
    commits inside the block (per-migration transactions, autocommit blocks)
    keep it; released at the end of the block, and by the server if the
    session dies. If the unlock fails the connection is invalidated (closed)
    so the lock cannot leak into a pool. If the block raises while a failed
    transaction is open, that transaction is rolled back first.

    SQLite: an exclusive ``flock`` on ``<database file>.migrate-<key>.lock``,
    dropped by the kernel if the process dies.

    Take it before Alembic reads the version table, i.e. around
    ``context.configure`` and ``run_migrations``, so a migrator that waited
    sees what the previous one applied::

        from writeturn.migrations import lock

        def do_run_migrations(connection):
            with lock(connection, namespace="myapp", name="alembic_version"):
                context.configure(connection=connection, target_metadata=target_metadata)
                with context.begin_transaction():
                    context.run_migrations()
    """
    lk = _LockName.checked(namespace, name, timeout)
    file_lock = _begin_lock(connection, lk, timeout)
    if file_lock is not None:
        with _closed_if_not_taken(file_lock):
            for delay in file_lock.waits(timeout):
                time.sleep(delay)
    try:
        yield
    finally:
        if file_lock is None:
            _pg_release(connection, lk)
        else:
            file_lock.release()


@contextlib.asynccontextmanager
async def lock_async(
    connection: AsyncConnection,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    name: str = "alembic_version",
    # A deadline, not asyncio.timeout(): cancelling a wait the server is
    # running would leave unknown whether the lock was granted.
    timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> AsyncIterator[None]:
    """Hold the migration lock like :func:`lock`, on an ``AsyncConnection``, without blocking.

    Waiting for it does not block the event loop. Useful to take the lock
    before ``await connection.run_sync(...)`` runs Alembic; the guarantees are
    those of :func:`lock`.
    """
    lk = _LockName.checked(namespace, name, timeout)
    file_lock = await connection.run_sync(_begin_lock, lk, timeout)
    if file_lock is not None:
        with _closed_if_not_taken(file_lock):
            for delay in file_lock.waits(timeout):
                await asyncio.sleep(delay)
    try:
        yield
    finally:
        if file_lock is None:
            await connection.run_sync(_pg_release, lk)
        else:
            file_lock.release()


# --------------------------------------------------------------------------- scripts


def default_script_location() -> str:
    """Return the directory of the library's Alembic scripts, from a wheel or a source checkout.

    An installed wheel ships them as the ``writeturn/_migrations`` package
    data; a source checkout (editable install) has them in ``migrations/`` at
    the repository root.
    """
    with contextlib.suppress(Exception):  # e.g. a namespace or zipped package
        packaged = importlib.resources.files("writeturn") / "_migrations"
        if packaged.is_dir() and (packaged / "env.py").is_file():
            return str(packaged)
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").is_file():
        return str(checkout)
    raise ConfigurationError(
        "cannot find writeturn's migration scripts: neither the installed package's "
        "writeturn/_migrations nor a source checkout's migrations/ directory exists; "
        "reinstall writeturn"
    )


def _config(
    script_location: str | os.PathLike[str] | None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Config:
    location = os.fspath(script_location) if script_location is not None else None
    cfg = Config()
    # set_main_option goes through configparser interpolation: escape '%'.
    cfg.set_main_option(
        "script_location", (location or default_script_location()).replace("%", "%%")
    )
    cfg.set_main_option("path_separator", "os")
    cfg.attributes[ATTR_NAMESPACE] = namespace
    cfg.attributes[ATTR_LOCK_TIMEOUT] = lock_timeout
    return cfg


def _script_directory(script_location: str | os.PathLike[str] | None = None) -> ScriptDirectory:
    return ScriptDirectory.from_config(_config(script_location))


def history(*, script_location: str | os.PathLike[str] | None = None) -> list[str]:
    """Return the library's revision ids, oldest first; reads no database.

    ``script_location`` (advanced) points at another copy of the scripts.
    """
    script = _script_directory(script_location)
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


# --------------------------------------------------------------------------- running


UrlOrEngine = str | URL | AsyncEngine


def _create_engine(url: str | URL) -> AsyncEngine:
    """Create the NullPool engine env.py and the programmatic API use for one run."""
    return unpooled_engine(url, {"server_settings": {"application_name": _APPLICATION_NAME}})


@contextlib.asynccontextmanager
async def _connect(url_or_engine: UrlOrEngine, *, detach: bool) -> AsyncIterator[AsyncConnection]:
    """Open one connection for a run; ``detach`` closes it instead of pooling it.

    A sync call runs in a loop of its own that ends with the call, so a
    connection it opened must not go back to a caller's engine pool.
    """
    if isinstance(url_or_engine, AsyncEngine):
        engine, owned = url_or_engine, False
        backend_of(normalize_url(engine.url))  # raises UnsupportedDatabase for other drivers
    elif isinstance(url_or_engine, str | URL):
        engine, owned = _create_engine(url_or_engine), True
    else:
        raise ConfigurationError(
            "url_or_engine must be a database URL or a sqlalchemy AsyncEngine, "
            f"not {type(url_or_engine).__name__}"
        )
    try:
        try:
            conn = await engine.connect()
        except (OSError, DBAPIError) as exc:
            raise DatabaseUnreachable(
                f"cannot connect to {redact(engine.url)}: {describe_error(exc, engine.url)}"
            ) from exc
        try:
            yield conn
        finally:
            if detach and not owned:
                await conn.invalidate()
            await conn.close()
    finally:
        if owned:
            await engine.dispose()


def _run_alembic(
    connection: Connection, cfg: Config, action: Literal["upgrade", "downgrade"], revision: str
) -> str | None:
    cfg.attributes[ATTR_CONNECTION] = connection
    if action == "upgrade":
        command.upgrade(cfg, revision)
    else:
        command.downgrade(cfg, revision)
    return _read_current(connection)


def _read_current(connection: Connection) -> str | None:
    idle = not connection.in_transaction()
    try:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()
    finally:
        if idle:
            connection.rollback()


async def _migrate(
    action: Literal["upgrade", "downgrade"],
    url_or_engine: UrlOrEngine,
    revision: str,
    *,
    namespace: str,
    lock_timeout: float,
    script_location: str | os.PathLike[str] | None,
    detach: bool,
) -> MigrationResult:
    if not isinstance(revision, str) or not revision:
        raise ConfigurationError(f"revision must be a non-empty string, not {revision!r}")
    _LockName.checked(namespace, VERSION_TABLE, lock_timeout)  # fail before connecting
    cfg = _config(script_location, namespace=namespace, lock_timeout=lock_timeout)
    steps: list[str] = []
    cfg.attributes[ATTR_STEPS] = steps
    # Taken here rather than in env.py so that a SQLite wait sleeps without
    # blocking the event loop; env.py sees ATTR_LOCK_HELD and does not retake it.
    cfg.attributes[ATTR_LOCK_HELD] = True
    async with (
        _connect(url_or_engine, detach=detach) as conn,
        lock_async(conn, namespace=namespace, name=VERSION_TABLE, timeout=lock_timeout),
    ):
        now = await conn.run_sync(_run_alembic, cfg, action, revision)
    return MigrationResult(tuple(steps), now)


def _sqlite_file_missing(url_or_engine: UrlOrEngine) -> bool:
    if isinstance(url_or_engine, AsyncEngine):
        url = url_or_engine.url
    elif isinstance(url_or_engine, str | URL):
        url = normalize_url(url_or_engine)
    else:
        return False
    database = url.database
    if backend_of(normalize_url(url)) != "sqlite" or not database:
        return False
    if database.startswith("file:"):
        # A URI filename: with mode=ro/rw/memory SQLite itself creates nothing.
        parsed = urlsplit(database)
        if "mode" in url.query or "mode=" in parsed.query:
            return False
        database = unquote(parsed.path)
    return not Path(database).exists()


async def _current(url_or_engine: UrlOrEngine, *, detach: bool) -> str | None:
    if _sqlite_file_missing(url_or_engine):
        return None  # connecting would create an empty database file
    async with _connect(url_or_engine, detach=detach) as conn:
        return await conn.run_sync(_read_current)


async def upgrade_async(
    url_or_engine: UrlOrEngine,
    revision: str = "head",
    *,
    namespace: str = DEFAULT_NAMESPACE,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    script_location: str | os.PathLike[str] | None = None,
) -> MigrationResult:
    """Upgrade the database to ``revision`` under the migration lock, applying each revision once.

    Concurrent runs (other processes, other hosts) wait for the lock, then
    apply only what is still missing. On Postgres all steps run in one
    transaction: a failing step leaves the schema as it was. On SQLite each
    step commits on its own. Raises :class:`MigrationLockTimeout` after
    ``lock_timeout`` seconds of waiting and :class:`DatabaseUnreachable` if no
    connection can be opened. ``url_or_engine`` is a URL (``sqlite://`` and
    ``postgresql://`` are mapped to the async drivers) or an ``AsyncEngine``.
    ``script_location`` (advanced) runs another copy of the scripts, which
    must use this package's ``env.py``.
    """
    return await _migrate(
        "upgrade",
        url_or_engine,
        revision,
        namespace=namespace,
        lock_timeout=lock_timeout,
        script_location=script_location,
        detach=False,
    )


async def downgrade_async(
    url_or_engine: UrlOrEngine,
    revision: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    script_location: str | os.PathLike[str] | None = None,
) -> MigrationResult:
    """Downgrade the database to ``revision`` (e.g. ``"base"``) under the migration lock.

    Same locking, transaction and error behaviour as :func:`upgrade_async`;
    downgrading to base drops the library's tables and their data.
    """
    return await _migrate(
        "downgrade",
        url_or_engine,
        revision,
        namespace=namespace,
        lock_timeout=lock_timeout,
        script_location=script_location,
        detach=False,
    )


async def current_async(url_or_engine: UrlOrEngine) -> str | None:
    """Return the database's current library revision, or ``None`` at base; takes no lock.

    A SQLite file that does not exist is at base and is not created.
    """
    return await _current(url_or_engine, detach=False)


def _outside_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise ConfigurationError(
        f"writeturn.migrations.{name}() cannot run inside a running event loop; "
        f"use `await writeturn.migrations.{name}_async(...)` there"
    )


def upgrade(
    url_or_engine: UrlOrEngine,
    revision: str = "head",
    *,
    namespace: str = DEFAULT_NAMESPACE,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    script_location: str | os.PathLike[str] | None = None,
) -> MigrationResult:
    """Upgrade like :func:`upgrade_async`, from synchronous code (not inside a running loop).

    Inside a running event loop it raises :class:`ConfigurationError`. An
    ``AsyncEngine`` passed here must not hold connections of another loop;
    the connection used is closed, not returned to its pool.
    """
    _outside_loop("upgrade")
    return asyncio.run(
        _migrate(
            "upgrade",
            url_or_engine,
            revision,
            namespace=namespace,
            lock_timeout=lock_timeout,
            script_location=script_location,
            detach=True,
        )
    )


def downgrade(
    url_or_engine: UrlOrEngine,
    revision: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    script_location: str | os.PathLike[str] | None = None,
) -> MigrationResult:
    """Downgrade like :func:`downgrade_async`, from synchronous code (not inside a running loop)."""
    _outside_loop("downgrade")
    return asyncio.run(
        _migrate(
            "downgrade",
            url_or_engine,
            revision,
            namespace=namespace,
            lock_timeout=lock_timeout,
            script_location=script_location,
            detach=True,
        )
    )


def current(url_or_engine: UrlOrEngine) -> str | None:
    """Return the current revision like :func:`current_async`, from synchronous code."""
    _outside_loop("current")
    return asyncio.run(_current(url_or_engine, detach=True))


def head_revision(*, script_location: str | os.PathLike[str] | None = None) -> str | None:
    """The newest revision of the scripts (None if there are none)."""
    return _script_directory(script_location).get_current_head()


def history_lines(*, script_location: str | os.PathLike[str] | None = None) -> list[str]:
    """One line per revision, oldest first: ``parent -> revision (head), description``."""
    script = _script_directory(script_location)
    heads = set(script.get_heads())
    lines = []
    for rev in reversed(list(script.walk_revisions())):
        down = rev.down_revision
        parent = ", ".join(down) if isinstance(down, tuple | list) else (down or "<base>")
        mark = " (head)" if rev.revision in heads else ""
        lines.append(f"{parent} -> {rev.revision}{mark}, {rev.doc}")
    return lines
