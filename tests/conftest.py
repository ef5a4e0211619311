"""Shared fixtures: real SQLite files in tmp_path, and a fresh Postgres database per test.

They come from writeturn's own pytest plugin (writeturn.testing), as a user's would,
with empty templates: writeturn's tests run the migrations themselves where they need
them. Postgres comes from WRITETURN_TEST_POSTGRES_URL (default: the docker-compose
service). Where nothing answers, Postgres tests skip with a message saying how to start
one; with WRITETURN_REQUIRE_POSTGRES=1 they fail instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import URL

# tests.integration._standby: the replicated_pair fixture (a Postgres primary and a
# streaming standby of its own, for failover tests).
pytest_plugins = ["writeturn.testing", "pytester", "tests.integration._standby"]


@pytest.fixture(scope="session")
def writeturn_migrate() -> None:
    """Empty databases: no template, a fresh Postgres database and no SQLite file yet."""
    return None


@pytest.fixture(scope="session")
def pg_admin_url(writeturn_postgres_server: URL) -> URL:
    """The Postgres server tests may use, or a skip (a failure when it is required)."""
    return writeturn_postgres_server


@pytest.fixture
def pg_url(writeturn_postgres_url: str) -> str:
    """A fresh, empty Postgres database for one test, dropped afterwards."""
    return writeturn_postgres_url


@pytest.fixture
def sqlite_url(writeturn_sqlite_url: str) -> str:
    """A fresh SQLite database file for one test (not created yet)."""
    return writeturn_sqlite_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs twice: on a SQLite file and on Postgres."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(autouse=True)
def _sqlite_threads_end_with_the_test(writeturn_no_sqlite_threads_left: None) -> Iterator[None]:
    """Every aiosqlite connection a test opens is closed, and its thread ended, by its end."""
    yield
