"""Stops that reach a batch mid-statement, and a pool with no connection to give."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome, PoolExhausted, TurnTimeout, WriteHandle, WriteSerializer

from ._db import create_tables, ledger, record
from .test_connections import slow_statement


async def test_a_cancel_during_a_batched_statement_keeps_the_connection(db_url: str) -> None:
    """The batch's task is never cancelled inside a driver call: the statement is
    stopped by the driver, the one write rolls back, the others commit."""
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(db_url, batch_max=8, batch_window=0.05) as ser,
    ):
        await create_tables(ser.engine)
        started = asyncio.Event()

        async def slow(session: AsyncSession) -> None:
            await record(session, "k", "slow", 0)
            started.set()
            await session.execute(text(slow_statement(db_url, seconds=0.5)))

        first = ser.submit(record, "k", "first", 1, key="k")
        victim = ser.submit(slow, key="k")
        last = ser.submit(record, "k", "last", 2, key="k")
        await started.wait()
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        await first
        await last
        assert victim.outcome is Outcome.ROLLED_BACK
        assert first.outcome is last.outcome is Outcome.COMMITTED
        assert [r[2] for r in await ledger(ser.engine)] == ["first", "last"]
        assert ser.stats().connections_invalidated == 0


async def test_a_pool_with_no_connection_to_give_is_named(db_url: str) -> None:
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(db_url, pool_size=1, max_overflow=0, pool_timeout=0.3) as ser,
    ):
        await create_tables(ser.engine)
        async with ser.engine.connect() as reader:  # the pool's only connection
            await reader.execute(text("SELECT 1"))
            h = ser.submit(record, "k", "w", 1, key="k")
            with pytest.raises(PoolExhausted, match="pool_size"):
                await h
            await reader.rollback()
        assert h.outcome is Outcome.WITHDRAWN
        assert isinstance(h.exception(), TimeoutError)
        await ser.run(record, "k", "w", 2, key="k", timeout=10)
        assert [r[3] for r in await ledger(ser.engine)] == [2]


async def test_a_write_waiting_for_the_pool_ends_at_its_own_timeout(db_url: str) -> None:
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(db_url, pool_size=1, max_overflow=0, pool_timeout=30) as ser,
    ):
        await create_tables(ser.engine)
        async with ser.engine.connect() as reader:  # the pool's only connection
            await reader.execute(text("SELECT 1"))
            t0 = asyncio.get_running_loop().time()
            h = ser.submit(record, "k", "w", 1, key="k", timeout=0.3)
            with pytest.raises(TurnTimeout):
                await h
            waited = asyncio.get_running_loop().time() - t0
            await reader.rollback()
        assert h.outcome is Outcome.WITHDRAWN
        assert waited < 30 / 4  # its timeout, not the pool's
        assert await ledger(ser.engine) == []


async def test_a_batch_waiting_for_another_process_lock_keeps_its_deadlines(
    sqlite_url: str,
) -> None:
    """SQLite: another connection holds the write lock. The batch's BEGIN IMMEDIATE waits
    no longer than its writes' deadlines (busy_timeout is 5 s), and each write stopped
    meanwhile ends at its own timeout, not when the BEGIN gives up."""
    path = sqlite_url.split("///", 1)[1]
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(sqlite_url, batch_max=8, sqlite_busy_timeout=5.0) as ser,
    ):
        await create_tables(ser.engine)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # what another process would hold
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            handles = [ser.submit(record, "k", "w", i, key="k", timeout=0.3) for i in range(3)]
            ends = []
            for h in handles:
                with pytest.raises(TurnTimeout):
                    await h
                ends.append(loop.time() - t0)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert all(h.outcome is Outcome.WITHDRAWN for h in handles)
        assert max(ends) < 5.0 / 4, ends  # their timeouts, not the 5 s busy timeout
        await ser.run(record, "k", "after", 9, key="k", timeout=10)
        assert [r[2] for r in await ledger(ser.engine)] == ["after"]


async def test_a_batch_stopped_before_its_task_starts_hands_the_turn_on(db_url: str) -> None:
    """The key's turn passes to a batch as the previous write ends; if the batch's
    only write is cancelled before the batch's task has run a step, the task never
    runs, and the turn must still pass on (before: every later write on the key
    waited forever)."""
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(db_url, batch_max=16) as ser,
    ):
        await create_tables(ser.engine)
        queued: list[WriteHandle[int]] = []
        inside, submitted = asyncio.Event(), asyncio.Event()

        async def block() -> None:
            async with ser.transaction(key="k") as session:
                await record(session, "k", "block", 0)
                inside.set()
                await submitted.wait()
            # The block ended: the queued write's turn came, and with it a batch
            # whose task has not started yet. Stop that write now.
            queued[0].cancel()

        holder = asyncio.ensure_future(block())
        await inside.wait()
        queued.append(ser.submit(record, "k", "cancelled", 1, key="k"))
        submitted.set()
        await holder
        with pytest.raises(asyncio.CancelledError):
            await queued[0]
        assert queued[0].outcome is Outcome.WITHDRAWN
        await ser.run(record, "k", "after", 2, key="k", timeout=5)
        assert [r[2] for r in await ledger(ser.engine)] == ["block", "after"]
