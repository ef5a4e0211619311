"""Several Postgres hosts in one URL (failover), against the real server.

The first host, ``127.0.0.1:1``, refuses connections; asyncpg then tries the next,
the live server. Both forms are tried: libpq's ``user@h1:p1,h2:p2/db`` and
SQLAlchemy's ``user@/db?host=h1:p1&host=h2:p2``, each with
``target_session_attrs=read-write``. Every entry point goes through the same URL
parsing: the serializer, the migrations, the doctor, the command line and the
pytest plugin.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from writeturn import Outcome, WriteSerializer, migrations
from writeturn.cli import main as cli_main
from writeturn.tools.doctor import diagnose

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
HEAD = "0001_journal"
DEAD = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once


def libpq_form(pg_url: str) -> str:
    url = make_url(pg_url)
    user = url.username or "postgres"
    userinfo = f"{user}:{url.password}" if url.password else user
    live = f"{url.host or '127.0.0.1'}:{url.port or 5432}"
    return f"postgresql://{userinfo}@{DEAD},{live}/{url.database}?target_session_attrs=read-write"


def sqlalchemy_form(pg_url: str) -> str:
    url = make_url(pg_url)
    user = url.username or "postgres"
    userinfo = f"{user}:{url.password}" if url.password else user
    live = f"{url.host or '127.0.0.1'}:{url.port or 5432}"
    return (
        f"postgresql+asyncpg://{userinfo}@/{url.database}"
        f"?host={DEAD}&host={live}&target_session_attrs=read-write"
    )


FORMS = pytest.mark.parametrize("form", [libpq_form, sqlalchemy_form])


async def deposit(session: Any, account: int, amount: int) -> int:
    await session.execute(
        text("UPDATE accounts SET balance = balance + :a WHERE id = :id"),
        {"a": amount, "id": account},
    )
    row = await session.execute(
        text("SELECT balance FROM accounts WHERE id = :id"), {"id": account}
    )
    return int(row.scalar_one())


@FORMS
async def test_migrations_and_a_committed_write_through_a_host_list(pg_url: str, form: Any) -> None:
    url = form(pg_url)
    result = await migrations.upgrade_async(url)
    assert result.steps == (HEAD,)
    assert await migrations.current_async(url) == HEAD

    async with WriteSerializer.from_url(url) as ser:
        async with ser.engine.begin() as conn:
            await conn.exec_driver_sql(
                "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)"
            )
            await conn.exec_driver_sql("INSERT INTO accounts VALUES (42, 0)")
        handle = ser.submit(deposit, 42, 10, key="account:42", idempotency_key="deposit-1")
        assert await handle == 10
        assert handle.outcome is Outcome.COMMITTED

    # Seen on the live server through its plain single-host URL.
    engine = create_async_engine(pg_url)
    try:
        async with engine.connect() as conn:
            balance = (await conn.execute(text("SELECT balance FROM accounts"))).scalar_one()
            journal = (
                await conn.execute(text("SELECT count(*) FROM writeturn_journal"))
            ).scalar_one()
    finally:
        await engine.dispose()
    assert (balance, journal) == (10, 1)


@FORMS
async def test_the_command_line_and_the_doctor_take_a_host_list(
    pg_url: str, form: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = form(pg_url)
    assert await asyncio.to_thread(cli_main, ["migrate", "upgrade", "--url", url]) == 0
    assert await asyncio.to_thread(cli_main, ["migrate", "current", "--url", url]) == 0
    assert HEAD in capsys.readouterr().out
    checks = await diagnose(url)
    failed = [c for c in checks if c.status == "FAIL"]
    assert failed == [], failed
    assert any(c.name == "connection" and c.status == "OK" for c in checks), checks


async def test_an_unknown_target_session_attrs_is_refused_before_connecting(pg_url: str) -> None:
    from writeturn.errors import UnsupportedDatabase

    url = libpq_form(pg_url).replace("read-write", "master")
    with pytest.raises(UnsupportedDatabase, match="target_session_attrs='master'"):
        WriteSerializer.from_url(url)
    with pytest.raises(UnsupportedDatabase, match="target_session_attrs='master'"):
        await migrations.upgrade_async(url)


PLUGIN_TESTS = """
import pytest
from sqlalchemy import text


@pytest.fixture
def writeturn_url(writeturn_postgres_url):
    return writeturn_postgres_url


@pytest.mark.asyncio
@pytest.mark.parametrize("round", [1, 2])
async def test_each_test_gets_its_database(writeturn_serializer, writeturn_postgres_url, round):
    assert "host=" in writeturn_postgres_url
    async with writeturn_serializer.engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM writeturn_journal"))).scalar()
    assert count == 0
"""


@FORMS
def test_the_pytest_plugin_takes_a_host_list(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pg_admin_url: Any, form: Any
) -> None:
    server = pg_admin_url.render_as_string(hide_password=False)
    monkeypatch.setenv("WRITETURN_TEST_POSTGRES_URL", form(server))
    monkeypatch.setenv("WRITETURN_REQUIRE_POSTGRES", "1")
    # The child pytest imports this checkout's writeturn, whatever its working directory.
    paths = (str(REPO / "src"), os.environ.get("PYTHONPATH"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    pytester.makeconftest('pytest_plugins = ["writeturn.testing"]\n')
    pytester.makepyfile(test_user=PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)
