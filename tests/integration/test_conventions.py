"""Library conventions a service relies on: named connections, libpq-style URL parameters,
and a logger that stays silent until the application configures logging."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import DatabaseUnreachable, WriteSerializer

from ._db import serializer


async def my_application_name(session: AsyncSession) -> str:
    sql = "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    return str((await session.execute(text(sql))).scalar_one())


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("query", "expected"),
    [("", "writeturn"), ("?application_name=billing", "billing")],
)
async def test_pg_stat_activity_names_writeturns_connections(
    pg_url: str, query: str, expected: str
) -> None:
    async with serializer(pg_url + query) as ser:
        assert await ser.run(my_application_name, key="k") == expected


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["disable", "prefer"])
async def test_an_sslmode_in_the_url_is_taken(pg_url: str, mode: str) -> None:
    # The test server runs without SSL: these modes connect in plain text.
    async with serializer(f"{pg_url}?sslmode={mode}&connect_timeout=5") as ser:
        assert await ser.run(my_application_name, key="k") == "writeturn"


@pytest.mark.postgres
async def test_sslmode_require_against_a_server_without_ssl_is_unreachable(pg_url: str) -> None:
    async with serializer(pg_url) as ser:
        async with ser.engine.connect() as conn:
            ssl_on = (await conn.execute(text("SHOW ssl"))).scalar_one()
    if ssl_on == "on":
        pytest.skip("this server offers SSL, so sslmode=require connects")
    ser = WriteSerializer.from_url(f"{pg_url}?sslmode=require")
    with pytest.raises(DatabaseUnreachable) as caught:
        await ser.start()
    await ser.close()
    assert "SSL" in str(caught.value) or "ssl" in str(caught.value), caught.value


LOG_SOMETHING = """
import logging, writeturn
{configure}
logging.getLogger("writeturn.asgi").warning("a warning from writeturn")
"""


@pytest.mark.parametrize("configured", [False, True])
def test_writeturn_logs_nothing_until_the_application_configures_logging(
    configured: bool,
) -> None:
    code = LOG_SOMETHING.format(configure="logging.basicConfig()" if configured else "")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    if configured:
        assert "a warning from writeturn" in done.stderr
    else:
        assert done.stderr == ""
