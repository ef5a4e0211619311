"""A server that no longer takes writes (a standby, a primary fenced read-only) is a
lost connection: the write ends ROLLED_BACK with ConnectionLost, its connection and
every pooled one made before it are discarded, and with ``retries=`` it runs again
on a fresh connection.

Here the server's refusal (SQLSTATE 25006, what a standby or a primary fenced with
``default_transaction_read_only`` answers) is made by the write's own transaction
turning read-only, on the real server; tests/integration/test_failover.py meets it
from a real fenced primary and a real standby.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import ConnectionLost, Outcome, WriteSerializer

from ._db import create_tables, ledger, record

pytestmark = pytest.mark.postgres

BACKEND = text("SELECT pg_backend_pid()")


@pytest.mark.parametrize("batch_max", [1, 8])
@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_a_refused_write_is_lost_rolled_back_and_its_connection_never_reused(
    pg_url: str, coordination: str, batch_max: int
) -> None:
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(pg_url, coordination=coordination, batch_max=batch_max) as ser,
    ):
        await create_tables(ser.engine)
        backends: list[int] = []

        async def refused(session: AsyncSession) -> None:
            backends.append((await session.execute(BACKEND)).scalar_one())
            await session.execute(text("SET TRANSACTION READ ONLY"))
            await record(session, "k", None, 1)

        async def write(session: AsyncSession, i: int) -> None:
            backends.append((await session.execute(BACKEND)).scalar_one())
            await record(session, "k", None, i)

        await ser.run(write, 0, key="k")
        handle = ser.submit(refused, key="k")
        with pytest.raises(ConnectionLost, match="no longer takes writes") as caught:
            await handle
        assert handle.outcome is Outcome.ROLLED_BACK
        assert "target_session_attrs=read-write" in str(caught.value)
        assert getattr(caught.value.__cause__.orig, "sqlstate", None) == "25006"  # type: ignore[union-attr]
        await ser.run(write, 2, key="k")
        # The refused write's connection was discarded, and the one before it with it.
        assert backends[2] not in backends[:2]
        assert ser.stats().connections_invalidated >= 1
        assert [r[3] for r in await ledger(ser.engine)] == [0, 2]


@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_a_refused_write_runs_again_on_a_fresh_connection_with_retries(
    pg_url: str, coordination: str
) -> None:
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(pg_url, coordination=coordination, retry_backoff=0.01) as ser,
    ):
        await create_tables(ser.engine)
        backends: list[int] = []

        async def write(session: AsyncSession) -> None:
            backends.append((await session.execute(BACKEND)).scalar_one())
            if len(backends) == 1:
                await session.execute(text("SET TRANSACTION READ ONLY"))
            await record(session, "k", None, len(backends))

        await ser.run(write, key="k", retries=1)
        assert len(backends) == 2 and backends[0] != backends[1]
        assert [r[3] for r in await ledger(ser.engine)] == [2]
        assert ser.stats().retries == 1
