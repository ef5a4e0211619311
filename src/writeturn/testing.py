"""A pytest plugin for testing services that use writeturn against real databases.

Each test gets a database of its own, cloned from a template that was migrated once
per session: a fresh Postgres database (``CREATE DATABASE x TEMPLATE y``, dropped
after the test) or a fresh SQLite file (a copy of a migrated file). Enable it in
your top-level ``conftest.py``::

    pytest_plugins = ["writeturn.testing"]

It needs pytest and pytest-asyncio (``pip install 'writeturn[testing]'``).

Fixtures:

- ``writeturn_postgres_url``: a fresh Postgres database for one test. The server
  comes from ``WRITETURN_TEST_POSTGRES_URL`` (default: the docker-compose
  service, ``postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/test``).
  Where nothing answers, the test is skipped with a message saying how to start
  one; with ``WRITETURN_REQUIRE_POSTGRES=1`` it fails instead (set it in CI).
- ``writeturn_sqlite_url``: a fresh SQLite file for one test.
- ``writeturn_url``: the database ``writeturn_serializer`` uses; SQLite by default.
  Override it in your conftest (e.g. return ``writeturn_postgres_url``).
- ``writeturn_serializer``: a started :class:`~writeturn.WriteSerializer` on
  ``writeturn_url``, closed (drained) after the test.
- ``writeturn_migrate``: what makes a template; by default writeturn's own
  migrations. Override it (session scope) to also run yours, or return ``None``
  for empty databases::

      @pytest.fixture(scope="session")
      def writeturn_migrate():
          def migrate(url: str) -> None:
              writeturn.migrations.upgrade(url)
              alembic.command.upgrade(my_alembic_config(url), "head")
          return migrate

- ``writeturn_postgres_server``: the server's admin URL (session scope).
- ``writeturn_no_sqlite_threads_left``: fails a test that leaves an aiosqlite
  connection (and its thread) open; request it, or wrap it in an autouse fixture.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

from . import migrations
from .serializer import WriteSerializer
from .urls import hosts_of, normalize_url, redact

__all__ = [
    "POSTGRES_DEFAULT",
    "writeturn_migrate",
    "writeturn_postgres_server",
    "writeturn_postgres_template",
    "writeturn_postgres_url",
    "writeturn_sqlite_template",
    "writeturn_sqlite_url",
    "writeturn_url",
    "writeturn_serializer",
    "writeturn_no_sqlite_threads_left",
]

#: The docker-compose service (see docker-compose.yml in writeturn's repository).
POSTGRES_DEFAULT = "postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/test"
START_HINT = (
    "start one with `docker compose up -d --wait` (the docker-compose.yml that comes with "
    "writeturn) or point WRITETURN_TEST_POSTGRES_URL at a server you can create databases on"
)

Migrate = Callable[[str], object]


def _server_url() -> URL:
    # normalize_url: libpq's host list (h1:5432,h2:5432) too, as every entry point takes it.
    return normalize_url(os.environ.get("WRITETURN_TEST_POSTGRES_URL", POSTGRES_DEFAULT))


async def _admin(sql: str, url: URL) -> None:
    hosts = hosts_of(url)  # several: tried in order, as the serializer's connections
    attrs = url.query.get("target_session_attrs")
    conn = await asyncpg.connect(
        host=[host or "127.0.0.1" for host, _ in hosts],
        port=[port or 5432 for _, port in hosts],
        **({"target_session_attrs": attrs} if isinstance(attrs, str) else {}),
        user=url.username or "postgres",
        password=url.password,
        database=url.database or "postgres",
        timeout=5,
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _database_url(server: URL, name: str) -> str:
    return server.set(drivername="postgresql+asyncpg", database=name).render_as_string(
        hide_password=False
    )


@pytest.fixture(scope="session")
def writeturn_migrate() -> Migrate | None:
    """What makes the template databases: writeturn's own migrations by default."""
    return migrations.upgrade


@pytest.fixture(scope="session")
def writeturn_postgres_server() -> URL:
    """The Postgres server tests may create databases on, or a skip (a failure when
    WRITETURN_REQUIRE_POSTGRES=1)."""
    url = _server_url()
    try:
        asyncio.run(_admin("SELECT 1", url))
    except Exception as exc:
        msg = f"Postgres at {redact(url)} is not reachable ({type(exc).__name__}); {START_HINT}"
        if os.environ.get("WRITETURN_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg + " [WRITETURN_REQUIRE_POSTGRES=1]")
        pytest.skip(msg)
    return url


@pytest.fixture(scope="session")
def writeturn_postgres_template(
    writeturn_postgres_server: URL, writeturn_migrate: Migrate | None
) -> Iterator[str | None]:
    """The name of the session's migrated template database (None: no migrations)."""
    if writeturn_migrate is None:
        yield None
        return
    name = f"wt_template_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"', writeturn_postgres_server))
    try:
        writeturn_migrate(_database_url(writeturn_postgres_server, name))
        yield name
    finally:
        asyncio.run(
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', writeturn_postgres_server)
        )


@pytest.fixture
def writeturn_postgres_url(
    writeturn_postgres_server: URL, writeturn_postgres_template: str | None
) -> Iterator[str]:
    """A fresh Postgres database for one test (a clone of the template), dropped afterwards."""
    name = f"wt_{uuid.uuid4().hex[:12]}"
    template = (
        "" if writeturn_postgres_template is None else f' TEMPLATE "{writeturn_postgres_template}"'
    )
    asyncio.run(_admin(f'CREATE DATABASE "{name}"{template}', writeturn_postgres_server))
    try:
        yield _database_url(writeturn_postgres_server, name)
    finally:
        asyncio.run(
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', writeturn_postgres_server)
        )


@pytest.fixture(scope="session")
def writeturn_sqlite_template(
    tmp_path_factory: pytest.TempPathFactory, writeturn_migrate: Migrate | None
) -> Path | None:
    """The session's migrated SQLite file (None: no migrations, tests start from no file)."""
    if writeturn_migrate is None:
        return None
    path = tmp_path_factory.mktemp("writeturn-template") / "template.db"
    writeturn_migrate(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def writeturn_sqlite_url(tmp_path: Path, writeturn_sqlite_template: Path | None) -> str:
    """A fresh SQLite database file for one test (a copy of the template, if any)."""
    path = tmp_path / "test.db"
    if writeturn_sqlite_template is not None:
        shutil.copyfile(writeturn_sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def writeturn_url(writeturn_sqlite_url: str) -> str:
    """The database writeturn_serializer uses: SQLite unless you override this fixture."""
    return writeturn_sqlite_url


@pytest_asyncio.fixture
async def writeturn_serializer(writeturn_url: str) -> AsyncIterator[WriteSerializer]:
    """A started serializer on ``writeturn_url``, drained and closed after the test."""
    ser = WriteSerializer.from_url(writeturn_url)
    async with ser:
        yield ser


def _sqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


@pytest.fixture
def writeturn_no_sqlite_threads_left() -> Iterator[None]:
    """Fails the test if an aiosqlite connection it opened is still open at its end.

    A connection's thread still running when its event loop closes dies with
    "Event loop is closed" later, in whichever test is running then.
    """
    before = _sqlite_threads()
    yield
    left = _sqlite_threads() - before
    for thread in left:
        thread.join(timeout=5)
    alive = sorted(t.name for t in left if t.is_alive())
    assert not alive, f"aiosqlite connections left open (their threads still run): {alive}"
