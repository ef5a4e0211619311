"""``writeturn doctor`` against real SQLite files and real Postgres databases.

Each Postgres test gets a fresh database (the ``pg_url`` fixture). Problems are
made for real: a session that keeps an advisory lock while idle, one left idle
in a transaction, the migration lock held through ``migrations.lock_async``,
a SQLite file in rollback-journal mode, a writer killed mid-transaction.

An unmigrated database is a WARN, not a FAIL (exit 0): plain writes work
without the library's tables; only journaled writes and idempotency keys need
the journal table, and those fail with a message naming the same fix.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from writeturn import WriteSerializer, migrations
from writeturn.cli import main as cli_main
from writeturn.dialects import lock_id
from writeturn.errors import ConfigurationError
from writeturn.migrations import URL_ENV, lock_async, lock_key
from writeturn.schema import VERSION_TABLE
from writeturn.tools.doctor import Check, diagnose, statement_kind
from writeturn.urls import SUPPORTED_FORMS, redact

pytestmark = pytest.mark.timeout(60)

SECRET = "pw_s3cret"
UNREACHABLE = f"postgresql+asyncpg://postgres:{SECRET}@127.0.0.1:1/test"

# Runs in a child process: a write transaction big enough to spill into the
# database file, then the process dies without COMMIT, leaving a hot journal.
CRASHING_WRITER = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
conn.execute("BEGIN")
conn.executemany("INSERT INTO t (v) VALUES (?)", [("x" * 500,) for _ in range(2000)])
conn.execute("COMMIT")
conn.execute("PRAGMA cache_size=1")
conn.execute("BEGIN")
conn.execute("UPDATE t SET v = 'y'")
os._exit(0)
"""

Holder = Callable[..., Awaitable[asyncpg.Connection]]


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def sqlite_file(url: str) -> Path:
    return Path(make_url(url).database or "")


def journal_size(database: Path) -> int:
    return Path(f"{database}-journal").stat().st_size


async def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``writeturn doctor ARGS`` through the CLI entry point; return (exit code, out, err)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["doctor", *args])
    out, err = capsys.readouterr()
    return code, out, err


async def doctor_process(*args: str) -> tuple[int, str, str]:
    """Run ``python -m writeturn doctor ARGS`` in a child process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "writeturn",
        "doctor",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def holder(pg_url: str) -> AsyncIterator[Holder]:
    """Open raw asyncpg sessions on the test database; every one is closed afterwards."""
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    opened: list[asyncpg.Connection] = []

    async def open_session(application_name: str = "holder") -> asyncpg.Connection:
        conn = await asyncpg.connect(dsn, server_settings={"application_name": application_name})
        opened.append(conn)
        return conn

    try:
        yield open_session
    finally:
        for conn in opened:
            if not conn.is_closed():
                conn.terminate()


async def healthy_sqlite(url: str) -> None:
    serializer = WriteSerializer.from_url(url)  # sets WAL on the file
    await serializer.start()
    await serializer.close()
    await migrations.upgrade_async(url)


# --------------------------------------------------------------------------- healthy


async def test_healthy_sqlite(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await healthy_sqlite(sqlite_url)

    checks = await diagnose(sqlite_url)
    assert [c for c in checks if c.status != "OK"] == []
    found = by_name(checks)
    assert found["journal mode"].detail == "journal_mode=wal"
    assert found["migration"].detail == f"at {migrations.history()[-1]} (head)"
    assert "SQLite library 3." in found["sqlite version"].detail
    assert "aiosqlite" in found["drivers"].detail

    code, out, _ = await doctor(capsys, "--url", sqlite_url)
    assert code == 0
    assert "OK    journal mode: journal_mode=wal" in out
    assert "OK    migration: at " in out
    assert out.rstrip().endswith("result: OK (0 FAIL, 0 WARN, 10 OK)")


async def test_healthy_postgres(
    pg_url: str, holder: Holder, capsys: pytest.CaptureFixture[str]
) -> None:
    await migrations.upgrade_async(pg_url)
    code, out, _ = await doctor(capsys, "--url", pg_url)
    assert code == 0, out
    assert not [line for line in out.splitlines() if line.startswith("FAIL")]
    assert "OK    migration: at " in out
    assert "OK    migration lock: the migration lock (namespace 'writeturn'" in out
    assert "OK    advisory locks: none held in this database" in out
    assert "OK    replication: primary, no streaming standby" in out

    # With the idle-in-transaction timeout set, a healthy database is all OK.
    admin = await holder()
    database = make_url(pg_url).database
    await admin.execute(
        f'ALTER DATABASE "{database}" SET idle_in_transaction_session_timeout = 60000'
    )
    checks = await diagnose(pg_url)
    # (connections counts the whole server, which other clients may crowd)
    assert [c for c in checks if c.status != "OK" and c.name != "connections"] == []
    assert by_name(checks)["idle_in_transaction_session_timeout"].detail == "1min"


# --------------------------------------------------------------------------- Postgres problems


async def test_leaked_advisory_lock(
    pg_url: str, holder: Holder, capsys: pytest.CaptureFixture[str]
) -> None:
    leaky = await holder("leaky-app")
    pid = leaky.get_server_pid()
    await leaky.execute("SELECT pg_advisory_lock($1)", lock_id("writeturn", "k"))

    # Idle for less than the threshold: a warning, not yet a leak.
    code, out, _ = await doctor(capsys, "--url", pg_url, "--key", "k")
    assert code == 0, out
    assert "WARN  write lock 'k': the write lock of key 'k'" in out
    assert "leaked if still idle after 60s" in out

    code, out, err = await doctor(
        capsys, "--url", pg_url, "--key", "k", "--key", "free-key", "--idle-threshold", "0"
    )
    assert code == 1, out
    line = next(ln for ln in out.splitlines() if ln.startswith("FAIL  write lock 'k'"))
    assert "leaked advisory lock" in line
    assert f"lock id {lock_id('writeturn', 'k')}" in line
    assert f"pid {pid} (application 'leaky-app', state idle)" in line
    assert "last query: SELECT (text hidden; --show-queries shows it)" in line
    assert "fix: fix the holder so it releases the lock (pg_advisory_unlock)" in out
    assert f"SELECT pg_terminate_backend({pid})" in out
    assert "OK    write lock 'free-key': the write lock of key 'free-key'" in out
    assert err == ""

    # A lock on a key the doctor was not told about is still found, by its id.
    await leaky.execute("SELECT pg_advisory_lock(42)")
    found = by_name(await diagnose(pg_url, idle_threshold=0))
    assert found["advisory lock 42"].status == "FAIL"
    assert found["advisory lock 42"].detail.startswith("leaked advisory lock: advisory lock 42")
    assert "2 held in this database by 1 session(s)" in found["advisory locks"].detail


async def test_other_sessions_sql_text_only_on_request(
    pg_url: str, holder: Holder, capsys: pytest.CaptureFixture[str]
) -> None:
    # A statement's literals may be secrets: by default only its kind is shown.
    leaky = await holder("token-app")
    await leaky.execute("BEGIN")
    await leaky.execute("SELECT pg_advisory_xact_lock(42), 'api_token=tok_LIVE_123456'")

    code, out, err = await doctor(capsys, "--url", pg_url, "--idle-threshold", "0")
    assert code == 1, out
    assert "tok_LIVE" not in out + err
    lock_line = next(ln for ln in out.splitlines() if ln.startswith("FAIL  advisory lock 42"))
    assert "last query: SELECT (text hidden; --show-queries shows it)" in lock_line
    idle_line = next(ln for ln in out.splitlines() if ln.startswith("FAIL  idle in transaction"))
    assert "last query: SELECT (text hidden" in idle_line

    code, out, _ = await doctor(capsys, "--url", pg_url, "--idle-threshold", "0", "--show-queries")
    assert code == 1, out
    assert "last query: SELECT pg_advisory_xact_lock(42), 'api_token=tok_LIVE_123456'" in out
    found = by_name(await diagnose(pg_url, idle_threshold=0))
    assert all("tok_LIVE" not in c.detail for c in found.values())


@pytest.mark.parametrize(
    ("query", "kind"),
    [
        ("select 1", "SELECT"),
        ("  /* app=x */ -- note\n INSERT INTO t VALUES ('secret')", "INSERT"),
        ("(SELECT 1) UNION (SELECT 2)", "SELECT"),
        ("WITH x AS (SELECT 1) UPDATE t SET a = 1", "WITH"),
        ("", "(empty)"),
        ("  ", "(empty)"),
        ("'secret' literal first", "(unknown)"),
    ],
)
def test_statement_kind(query: str, kind: str) -> None:
    assert statement_kind(query) == kind


async def test_idle_in_transaction(
    pg_url: str, holder: Holder, capsys: pytest.CaptureFixture[str]
) -> None:
    forgetful = await holder("forgetful-app")
    pid = forgetful.get_server_pid()
    await forgetful.execute("BEGIN")
    await forgetful.execute("SELECT 1")

    code, out, _ = await doctor(capsys, "--url", pg_url, "--idle-threshold", "0")
    assert code == 1, out
    line = next(ln for ln in out.splitlines() if ln.startswith("FAIL  idle in transaction"))
    assert f"pid {pid} (application 'forgetful-app') is idle in transaction for" in line
    assert "last query: SELECT (text hidden" in line
    assert f"SELECT pg_terminate_backend({pid})" in out
    assert "idle_in_transaction_session_timeout" in out

    # An aborted transaction is just as stuck; under the threshold it is a warning.
    await forgetful.execute("ROLLBACK")
    await forgetful.execute("BEGIN")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await forgetful.execute("SELECT 1 / 0")
    found = by_name(await diagnose(pg_url))
    check = found[f"idle in transaction (pid {pid})"]
    assert check.status == "WARN"
    assert "is idle in transaction (aborted) for" in check.detail


async def test_migration_lock_held(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    engine = create_async_engine(pg_url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            pid = await conn.scalar(text("SELECT pg_backend_pid()"))
            await conn.rollback()
            async with lock_async(conn, name=VERSION_TABLE):
                code, out, _ = await doctor(capsys, "--url", pg_url)
                checks = await diagnose(pg_url, idle_threshold=0)
    finally:
        await engine.dispose()
    assert code == 0, out
    key = lock_key("writeturn", VERSION_TABLE)
    assert (
        f"WARN  migration lock: the migration lock (namespace 'writeturn', lock id {key}) "
        f"is held by pid {pid}"
    ) in out
    check = by_name(checks)["migration lock"]
    assert check.status == "FAIL"
    assert check.detail.startswith("leaked advisory lock: the migration lock")

    # Another namespace has a migration lock of its own, which is free.
    other = by_name(await diagnose(pg_url, namespace="myapp"))["migration lock"]
    assert other.status == "OK"
    assert other.detail.endswith("is free")


async def test_running_holder_is_not_leaked(pg_url: str, holder: Holder) -> None:
    """A lock held by a running statement is no leak; a waiter is named."""
    busy, waiting = await holder("busy-writer"), await holder("waiting-writer")
    busy_pid, waiting_pid = busy.get_server_pid(), waiting.get_server_pid()
    key = lock_id("writeturn", "hot")
    await busy.execute("BEGIN")
    await busy.execute("SELECT pg_advisory_xact_lock($1)", key)
    running = asyncio.create_task(busy.execute("SELECT pg_sleep(30)"))
    blocked = asyncio.create_task(waiting.execute("SELECT pg_advisory_xact_lock($1)", key))
    try:
        for _ in range(100):  # until the waiter queues behind the holder
            found = by_name(
                await diagnose(pg_url, keys=["hot"], idle_threshold=0, show_queries=True)
            )
            check = found["write lock 'hot'"]
            if "wait for it" in check.detail:
                break
            await asyncio.sleep(0.05)
    finally:
        busy.terminate()
        waiting.terminate()
        await asyncio.gather(running, blocked, return_exceptions=True)
    assert check.status == "WARN"  # its transaction ran longer than the threshold
    assert "leaked" not in check.detail
    assert f"held by pid {busy_pid} (application 'busy-writer', state active)" in (check.detail)
    assert f"1 session(s) wait for it (pid {waiting_pid})" in check.detail
    assert "query: SELECT pg_sleep(30)" in check.detail


async def test_unmigrated_postgres_is_a_warning(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await doctor(capsys, "--url", pg_url)
    assert code == 0, out
    assert "WARN  migration: no writeturn revision" in out
    assert "WARN  journal table: writeturn_journal does not exist" in out
    # The fix is a command to paste, with the password (if the URL has one) masked.
    assert f"fix: writeturn migrate upgrade --url {shlex.quote(redact(pg_url))}" in out
    password = make_url(pg_url).password
    assert not password or f":{password}@" not in out


async def test_unreachable_postgres(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await doctor(capsys, "--url", UNREACHABLE)
    assert code == 1
    assert "FAIL  connection: database unreachable: cannot connect to" in out
    assert "postgres:***@127.0.0.1:1/test" in out
    assert SECRET not in out + err

    code, out, err = await doctor(capsys, "--json", "--url", UNREACHABLE)
    assert code == 1
    assert SECRET not in out + err
    assert "connection" in {c["check"] for c in json.loads(out)}


# --------------------------------------------------------------------------- SQLite problems


async def test_sqlite_not_in_wal(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with sqlite3.connect(sqlite_file(sqlite_url)) as conn:  # rollback-journal mode (DELETE)
        conn.execute("CREATE TABLE t (x INTEGER)")
    conn.close()
    monkeypatch.setenv(URL_ENV, sqlite_url)  # no --url: the environment names the database

    code, out, _ = await doctor(capsys)
    assert code == 0, out
    assert "WARN  journal mode: journal_mode=delete, not wal" in out
    assert "PRAGMA journal_mode=WAL" in out
    assert "WriteSerializer.from_url" in out
    assert "WARN  migration: no writeturn revision" in out


async def test_sqlite_hot_journal(sqlite_url: str) -> None:
    path = sqlite_file(sqlite_url)
    crash = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASHING_WRITER, str(path))
    assert await crash.wait() == 0
    assert journal_size(path) > 0

    check = by_name(await diagnose(sqlite_url))["rollback journal"]
    assert check.status == "WARN"
    assert "hot journal" in check.detail
    with sqlite3.connect(path) as conn:  # the crashed UPDATE was rolled back
        assert conn.execute("SELECT count(*) FROM t WHERE v = 'y'").fetchone() == (0,)
    conn.close()


async def test_missing_sqlite_file(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await doctor(capsys, "--url", sqlite_url)
    assert code == 1
    assert (
        f"FAIL  database file: SQLite database file {sqlite_file(sqlite_url)} does not exist" in out
    )
    assert "fix: fix the path in the URL" in out
    assert not sqlite_file(sqlite_url).exists()  # the doctor did not create it


# --------------------------------------------------------------------------- usage


async def test_usage_errors(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = await doctor(capsys, "--url", f"mysql://root:{SECRET}@localhost/app")
    assert code == 2
    assert out == ""
    assert "unsupported database URL" in err
    assert SUPPORTED_FORMS in " ".join(err.split())
    assert SECRET not in err

    monkeypatch.delenv(URL_ENV, raising=False)
    code, out, err = await doctor(capsys)
    assert code == 2
    assert f"no database URL: pass --url URL or set {URL_ENV}" in err

    with pytest.raises(SystemExit) as exited:
        await doctor(capsys, "--url", sqlite_url, "--idle-threshold", "-1")
    assert exited.value.code == 2

    with pytest.raises(ConfigurationError, match="single string"):
        await diagnose(sqlite_url, keys="k")
    with pytest.raises(ConfigurationError, match="idle_threshold"):
        await diagnose(sqlite_url, idle_threshold=float("nan"))
    with pytest.raises(ConfigurationError, match="namespace"):
        await diagnose(sqlite_url, namespace="")


# --------------------------------------------------------------------------- JSON, subprocess


async def test_json_in_a_subprocess(pg_url: str, holder: Holder) -> None:
    leaky = await holder("leaky-app")
    await leaky.execute("SELECT pg_advisory_lock($1)", lock_id("writeturn", "k"))
    args = ("--url", pg_url, "--key", "k", "--idle-threshold", "0")

    code, out, err = await doctor_process("--json", *args)
    assert code == 1, err
    report = json.loads(out)
    assert all(set(item) == {"check", "status", "detail", "fix"} for item in report)
    expected = await diagnose(pg_url, keys=["k"], idle_threshold=0)
    assert [item["check"] for item in report] == [c.name for c in expected]
    leaked = next(item for item in report if item["check"] == "write lock 'k'")
    assert leaked["status"] == "FAIL"
    assert f"pid {leaky.get_server_pid()}" in leaked["detail"]
    assert "pg_terminate_backend" in leaked["fix"]

    code, out, _ = await doctor_process(*args)
    assert code == 1
    assert "FAIL  write lock 'k': leaked advisory lock" in out


async def test_healthy_sqlite_in_a_subprocess(sqlite_url: str) -> None:
    await healthy_sqlite(sqlite_url)
    code, out, err = await doctor_process("--url", sqlite_url, "--json")
    assert code == 0, err
    assert {item["status"] for item in json.loads(out)} == {"OK"}
