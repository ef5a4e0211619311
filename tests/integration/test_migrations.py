"""Migrations of writeturn's own tables and the migration lock, on real SQLite files and Postgres.

Every test checks the database afterwards. Postgres tests each get a fresh
database (``wt_mig_<random>``) on the server of the shared ``pg_admin_url``
fixture (``WRITETURN_TEST_POSTGRES_URL``; skipped when unreachable unless
``WRITETURN_REQUIRE_POSTGRES=1``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from writeturn import migrations
from writeturn.cli import main as cli_main
from writeturn.errors import ConfigurationError
from writeturn.migrations import (
    TEST_DELAY_ENV,
    MigrationLockTimeout,
    lock,
    lock_async,
    lock_key,
)
from writeturn.schema import VERSION_TABLE
from writeturn.urls import normalize_url

REPO = Path(__file__).resolve().parents[2]
HEAD = "0001_journal"
JOURNAL = "writeturn_journal"
PROCESSES = 8

# Runs before a racing process's command: warm the imports, say "ready", then
# wait for the barrier file so all processes reach the lock at the same moment.
BARRIER_PRELUDE = """
import os, runpy, sys, time
import aiosqlite, asyncpg, alembic.command, alembic.config, writeturn.cli, writeturn.migrations
barrier = sys.argv[1]
open(f"{barrier}.ready.{os.getpid()}", "w").close()
while not os.path.exists(barrier):
    time.sleep(0.002)
"""
RUN_WRITETURN = BARRIER_PRELUDE + (
    "sys.argv = [sys.argv[0], *sys.argv[2:]]\n"
    "runpy.run_module('writeturn', run_name='__main__', alter_sys=True)\n"
)
RUN_ALEMBIC = BARRIER_PRELUDE + (
    "from alembic.config import main\nsys.exit(main(argv=sys.argv[2:], prog='alembic'))\n"
)

FAILING_REVISION = '''"""Creates a table, then fails."""

from alembic import op
import sqlalchemy as sa

revision = "0002_fails"
down_revision = "0001_journal"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("wt_half_done", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("THIS IS NOT SQL")


def downgrade():
    op.drop_table("wt_half_done")
'''


# --------------------------------------------------------------------------- helpers


def url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout's sources first, no stray settings."""
    env = {k: v for k, v in os.environ.items() if k not in (migrations.URL_ENV, TEST_DELAY_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "writeturn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**env),
        cwd=REPO,
    )


def run_alembic(url: URL, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url_text(url)}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        cwd=REPO,
    )


async def _state_async(url: URL) -> tuple[set[str], list[str]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            versions: list[str] = []
            if VERSION_TABLE in tables:
                result = await conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))
                versions = [str(v) for v in result.scalars()]
            return tables, versions
    finally:
        await engine.dispose()


def db_state(url: URL) -> tuple[set[str], list[str]]:
    """(tables in the database, rows of writeturn's version table)."""
    return asyncio.run(_state_async(url))


PG_ADVISORY_LOCKS = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


async def _execute_async(url: URL, sql: str) -> Any:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            result = await conn.exec_driver_sql(sql)
            value = result.scalar() if result.returns_rows else None
            await conn.commit()
            return value
    finally:
        await engine.dispose()


def execute(url: URL, sql: str) -> Any:
    """Run one statement on its own connection; return its first value, if any."""
    return asyncio.run(_execute_async(url, sql))


async def _admin(admin_url: URL, sql: str) -> None:
    engine = create_async_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(sql)
    finally:
        await engine.dispose()


@pytest.fixture
def mig_pg_url(pg_admin_url: URL) -> Iterator[URL]:
    """A fresh Postgres database for one test, dropped (with its sessions) afterwards."""
    admin = normalize_url(pg_admin_url)
    name = f"wt_mig_{secrets.token_hex(6)}"
    asyncio.run(_admin(admin, f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name)
    finally:
        asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def mig_sqlite_url(tmp_path: Path) -> URL:
    return URL.create("sqlite+aiosqlite", database=str(tmp_path / "app.db"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def mig_url(request: pytest.FixtureRequest) -> URL:
    """Each test that takes this runs on a SQLite file and on a fresh Postgres database."""
    fixture = "mig_sqlite_url" if request.param == "sqlite" else "mig_pg_url"
    url = request.getfixturevalue(fixture)
    assert isinstance(url, URL)
    return url


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["writeturn", "alembic"])
def test_concurrent_upgrades_apply_the_revision_once(
    mig_url: URL, tool: str, tmp_path: Path
) -> None:
    barrier = tmp_path / "go"
    if tool == "writeturn":
        code, args = RUN_WRITETURN, ["migrate", "upgrade", "--url", url_text(mig_url)]
    else:
        code, args = RUN_ALEMBIC, ["-x", f"url={url_text(mig_url)}", "upgrade", "head"]
    # The winner sleeps inside the lock before committing, so the others surely wait.
    env = child_env(**{TEST_DELAY_ENV: "0.5"})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(barrier), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("go.ready.*"))) < PROCESSES:
            assert time.monotonic() < deadline, "the racing processes did not start"
            assert all(p.poll() is None for p in procs), "a racing process died early"
            time.sleep(0.01)
        barrier.touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()

    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, f"exit {p.returncode}\nstdout: {out}\nstderr: {err}"
    if tool == "writeturn":
        applied = [out for out, _ in outputs if out.startswith(f"applied {HEAD}")]
        idle = [out for out, _ in outputs if out.startswith("nothing to do")]
        assert (len(applied), len(idle)) == (1, PROCESSES - 1), outputs
    else:
        runs = [err for _, err in outputs if f"Running upgrade  -> {HEAD}" in err]
        assert len(runs) == 1, outputs
    tables, versions = db_state(mig_url)
    assert JOURNAL in tables
    assert versions == [HEAD]


# --------------------------------------------------------------------------- round trip


def test_round_trip_and_no_drift(mig_url: URL) -> None:
    first = migrations.upgrade(mig_url)
    assert first.steps == (HEAD,) and first.revision == HEAD
    assert migrations.upgrade(mig_url).steps == ()  # already at head: nothing re-applied
    assert db_state(mig_url) == ({JOURNAL, VERSION_TABLE}, [HEAD])

    down = migrations.downgrade(mig_url, "base")
    assert down.steps == (HEAD,) and down.revision is None
    tables, versions = db_state(mig_url)
    assert JOURNAL not in tables and versions == []
    assert migrations.current(mig_url) is None

    assert migrations.upgrade(mig_url, "head").steps == (HEAD,)
    assert migrations.current(mig_url) == HEAD

    # The journal's constraints: NULL idempotency keys repeat, others may not.
    insert = "INSERT INTO writeturn_journal (namespace, key, seq, idempotency_key) VALUES "
    execute(mig_url, insert + "('ns', 'k', 1, NULL), ('ns', 'k', 2, NULL), ('ns', 'k', 3, 'i')")
    with pytest.raises(IntegrityError):
        execute(mig_url, insert + "('ns', 'k', 4, 'i')")
    with pytest.raises(IntegrityError):
        execute(mig_url, insert + "('ns', 'k', 1, 'other')")
    assert execute(mig_url, "SELECT count(committed_at) FROM writeturn_journal") == 3

    # An application's own table in the same database is not drift.
    execute(mig_url, "CREATE TABLE app_orders (id INTEGER PRIMARY KEY)")
    check = run_alembic(mig_url, "check")
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout


# --------------------------------------------------------------------------- failures


@pytest.mark.postgres
async def test_failed_migration_leaves_schema_and_releases_lock(
    mig_pg_url: URL, tmp_path: Path
) -> None:
    scripts = tmp_path / "scripts"
    shutil.copytree(REPO / "migrations", scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "0002_fails.py").write_text(FAILING_REVISION)
    # A pooled engine: its connection outlives the run, so only an explicit
    # unlock (not the end of the session) can free the lock.
    engine = create_async_engine(mig_pg_url, pool_size=1, max_overflow=0)
    try:
        with pytest.raises(DBAPIError, match="THIS IS NOT SQL"):
            await migrations.upgrade_async(engine, script_location=scripts, lock_timeout=5)
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql(PG_ADVISORY_LOCKS)).scalar() == 0
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
            await conn.rollback()
        # One transaction for the whole run: not even 0001 or the version table remain.
        assert tables == []
        result = await migrations.upgrade_async(engine, lock_timeout=5)
        assert result == migrations.MigrationResult((HEAD,), HEAD)
    finally:
        await engine.dispose()
    assert await _state_async(mig_pg_url) == ({JOURNAL, VERSION_TABLE}, [HEAD])


@pytest.mark.postgres
@pytest.mark.slow
def test_killed_lock_holder_does_not_block_the_next_run(mig_pg_url: URL) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-m", "writeturn", "migrate", "upgrade", "--url", url_text(mig_pg_url)],
        cwd=REPO,
        env=child_env(**{TEST_DELAY_ENV: "30"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Holding the lock and sleeping after the applied step, transaction open.
        waiting = (
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() "
            "AND a.application_name = 'writeturn-migrate' AND a.state = 'idle in transaction'"
        )
        deadline = time.monotonic() + 20
        while execute(mig_pg_url, waiting) != 1:
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        os.kill(holder.pid, signal.SIGKILL)
        holder.communicate(timeout=10)

        started = time.monotonic()
        result = migrations.upgrade(mig_pg_url, lock_timeout=20)
        elapsed = time.monotonic() - started
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    assert result.steps == (HEAD,)  # the killed run's work was rolled back
    assert elapsed < 5, f"waited {elapsed:.1f}s for a dead holder's lock"
    assert db_state(mig_pg_url) == ({JOURNAL, VERSION_TABLE}, [HEAD])


@pytest.mark.postgres
async def test_lock_timeout_on_postgres(mig_pg_url: URL) -> None:
    key = lock_key("writeturn", VERSION_TABLE)
    engine = create_async_engine(mig_pg_url, poolclass=NullPool)
    try:
        async with engine.connect() as holder:
            await holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            await holder.commit()
            pid = (await holder.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
            await holder.commit()

            started = time.monotonic()
            with pytest.raises(MigrationLockTimeout) as caught:
                await migrations.upgrade_async(mig_pg_url, lock_timeout=1)
            elapsed = time.monotonic() - started
            assert 0.9 <= elapsed < 3
            message = str(caught.value)
            for part in ("'writeturn'", VERSION_TABLE, str(key), f"pid {pid}", "pg_locks"):
                assert part in message

            with pytest.raises(ConfigurationError, match="upgrade_async"):
                migrations.upgrade(mig_pg_url)

            cli = await asyncio.to_thread(
                run_cli, "migrate", "upgrade", "--url", url_text(mig_pg_url), "--lock-timeout", "1"
            )
            assert cli.returncode == 1
            assert cli.stdout == ""
            lines = cli.stderr.strip().splitlines()
            assert len(lines) == 1 and "timed out" in lines[0] and VERSION_TABLE in lines[0]
    finally:
        await engine.dispose()
    assert JOURNAL not in (await _state_async(mig_pg_url))[0]


def test_lock_timeout_on_sqlite(mig_sqlite_url: URL) -> None:
    database = mig_sqlite_url.database
    assert database is not None
    # The holder uses the stdlib driver, as a user's synchronous env.py might.
    engine = create_engine(f"sqlite:///{database}", poolclass=NullPool)
    try:
        with engine.connect() as holder, lock(holder, name=VERSION_TABLE, timeout=5):
            started = time.monotonic()
            with pytest.raises(MigrationLockTimeout) as caught:
                migrations.upgrade(mig_sqlite_url, lock_timeout=1)
            elapsed = time.monotonic() - started
            assert 0.9 <= elapsed < 3
            message = str(caught.value)
            for part in (VERSION_TABLE, database, f"pid {os.getpid()}", ".lock"):
                assert part in message

            cli = run_cli(
                "migrate", "upgrade", "--url", url_text(mig_sqlite_url), "--lock-timeout", "1"
            )
            assert cli.returncode == 1
            lines = cli.stderr.strip().splitlines()
            assert len(lines) == 1 and "timed out" in lines[0] and VERSION_TABLE in lines[0]
            assert JOURNAL not in db_state(mig_sqlite_url)[0]
    finally:
        engine.dispose()
    # Released at the end of the block: the next run proceeds at once.
    assert migrations.upgrade(mig_sqlite_url, lock_timeout=2).steps == (HEAD,)


# --------------------------------------------------------------------------- user envs


def test_lock_excludes_concurrent_user_sections(mig_url: URL) -> None:
    """Critical sections under lock()/lock_async() never overlap, commits inside included."""
    workers = 4
    execute(mig_url, "CREATE TABLE counter (n INTEGER NOT NULL)")
    execute(mig_url, "INSERT INTO counter VALUES (0)")
    intervals: list[tuple[float, float]] = []
    failures: list[BaseException] = []
    start = threading.Barrier(workers)

    def section(conn: Connection) -> None:
        began = time.monotonic()
        n = conn.execute(text("SELECT n FROM counter")).scalar_one()
        conn.commit()  # a commit inside the block must not release the lock
        time.sleep(0.15)
        conn.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})
        conn.commit()
        intervals.append((began, time.monotonic()))

    def locked_section(conn: Connection) -> None:
        with lock(conn, namespace="myapp", timeout=20):
            section(conn)

    async def with_lock_async(conn: AsyncConnection) -> None:
        async with lock_async(conn, namespace="myapp", timeout=20):
            await conn.run_sync(section)

    async def worker(use_async: bool) -> None:
        engine = create_async_engine(mig_url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                await asyncio.to_thread(start.wait, 10)
                if use_async:
                    await with_lock_async(conn)
                else:
                    await conn.run_sync(locked_section)
        finally:
            await engine.dispose()

    def thread_main(use_async: bool) -> None:
        try:
            asyncio.run(worker(use_async))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=thread_main, args=(i % 2 == 1,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert len(intervals) == workers
    ordered = sorted(intervals)
    for (_, end), (begin, _) in itertools.pairwise(ordered):
        assert begin >= end, f"critical sections overlapped: {ordered}"
    assert execute(mig_url, "SELECT n FROM counter") == workers
    if mig_url.get_backend_name() == "postgresql":
        assert execute(mig_url, PG_ADVISORY_LOCKS) == 0


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("action", ["current", "upgrade"])
def test_cli_never_prints_the_password(action: str) -> None:
    url = "postgresql+asyncpg://postgres:s3cretpw@127.0.0.1:1/none"  # nothing listens on port 1
    result = run_cli("migrate", action, "--url", url)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "s3cretpw" not in output
    assert "postgres:***@127.0.0.1:1/none" in output
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_without_url_and_history(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(migrations.URL_ENV, raising=False)
    assert cli_main(["migrate", "current"]) == 2
    err = capsys.readouterr().err
    assert "--url" in err and migrations.URL_ENV in err

    assert cli_main(["migrate", "history"]) == 0
    assert (
        capsys.readouterr().out == f"<base> -> {HEAD} (head), Create the writeturn_journal table.\n"
    )
    assert migrations.history() == [HEAD]


def test_cli_upgrade_and_current_from_the_environment(
    mig_sqlite_url: URL, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(migrations.URL_ENV, url_text(mig_sqlite_url))
    assert cli_main(["migrate", "current"]) == 0
    assert capsys.readouterr().out == "base\n"
    assert not Path(str(mig_sqlite_url.database)).exists()  # `current` creates no database
    assert cli_main(["migrate", "upgrade"]) == 0
    assert capsys.readouterr().out.startswith(f"applied {HEAD} on sqlite+aiosqlite:///")
    assert cli_main(["migrate", "current"]) == 0
    assert capsys.readouterr().out == f"{HEAD} (head)\n"
    assert cli_main(["migrate", "downgrade", "base"]) == 0
    assert capsys.readouterr().out.startswith(f"reverted {HEAD} on ")
    assert db_state(mig_sqlite_url)[1] == []


@pytest.mark.parametrize("form", ["file:{path}", "file://{path}"])
def test_current_on_a_uri_filename_creates_no_database(tmp_path: Path, form: str) -> None:
    path = tmp_path / "app.db"
    url = f"sqlite:///{form.format(path=path)}?uri=true"
    assert migrations.current(url) is None
    assert not path.exists()  # SQLite would create it on connect
    migrations.upgrade(url)
    assert migrations.current(url) == HEAD


# --------------------------------------------------------------------------- packaging


@pytest.mark.slow
def test_wheel_ships_and_runs_the_migration_scripts(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(dist)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("writeturn-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    assert "writeturn/_migrations/env.py" in names
    assert f"writeturn/_migrations/versions/{HEAD}.py" in names

    # Run from the unpacked wheel, away from the checkout: the scripts must come from it.
    env = {k: v for k, v in os.environ.items() if k not in (migrations.URL_ENV, TEST_DELAY_ENV)}
    env["PYTHONPATH"] = str(site)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from writeturn import migrations as m; print(m.default_script_location())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == site / "writeturn" / "_migrations"
    url = f"sqlite:///{tmp_path / 'wheel.db'}"
    upgrade = subprocess.run(
        [sys.executable, "-m", "writeturn", "migrate", "upgrade", "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert db_state(normalize_url(url)) == ({JOURNAL, VERSION_TABLE}, [HEAD])
