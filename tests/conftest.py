"""Shared fixtures: real SQLite files in tmp_path, and a fresh Postgres database per test.

Postgres comes from WRITETURN_TEST_POSTGRES_URL (default: the docker-compose
service). Where nothing answers, Postgres tests skip with a message saying how
to start one; with WRITETURN_REQUIRE_POSTGRES=1 they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url

PG_DEFAULT = "postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/test"  # docker-compose.yml
START_HINT = (
    "start one with `docker compose up -d --wait` (see docker-compose.yml) or point "
    "WRITETURN_TEST_POSTGRES_URL at a server you can create databases on"
)


def _admin_url() -> URL:
    return make_url(os.environ.get("WRITETURN_TEST_POSTGRES_URL", PG_DEFAULT))


def _connect_kwargs(url: URL) -> dict[str, object]:
    return {
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "user": url.username or "postgres",
        "password": url.password,
        "database": url.database or "postgres",
    }


async def _admin(sql: str, url: URL) -> None:
    conn = await asyncpg.connect(**_connect_kwargs(url), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_admin_url() -> URL:
    """The Postgres server tests may use, or a skip (a failure when it is required)."""
    url = _admin_url()
    try:
        asyncio.run(_admin("SELECT 1", url))
    except Exception as exc:
        msg = (
            f"Postgres at {url.render_as_string(hide_password=True)} is not reachable "
            f"({type(exc).__name__}); {START_HINT}"
        )
        if os.environ.get("WRITETURN_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg + " [WRITETURN_REQUIRE_POSTGRES=1]")
        pytest.skip(msg)
    return url


@pytest.fixture
def pg_url(pg_admin_url: URL) -> Iterator[str]:
    """A fresh, empty Postgres database for one test, dropped afterwards."""
    name = f"wt_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"', pg_admin_url))
    try:
        yield pg_admin_url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', pg_admin_url))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for one test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs twice: on a SQLite file and on Postgres."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


def _sqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


@pytest.fixture(autouse=True)
def _sqlite_threads_end_with_the_test() -> Iterator[None]:
    """Every aiosqlite connection a test opens is closed, and its thread ended, by its end.

    A thread still running when its event loop closes dies with "Event loop is
    closed" later, in whichever test is running then.
    """
    before = _sqlite_threads()
    yield
    left = _sqlite_threads() - before
    for thread in left:
        thread.join(timeout=5)
    alive = sorted(t.name for t in left if t.is_alive())
    assert not alive, f"aiosqlite connections left open (their threads still run): {alive}"
