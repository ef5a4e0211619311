"""Retries: transient failures run the write again, in the same turn; others do not."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome

from ._db import create_tables, ledger, pg_leftovers, record, serializer

SERIALIZATION_FAILURE = (
    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$"
)


@pytest.mark.postgres
async def test_a_serialization_failure_is_retried_in_the_same_turn(pg_url: str) -> None:
    async with serializer(pg_url, retries=3, retry_backoff=0.01) as ser:
        await create_tables(ser.engine)
        attempts: list[int] = []
        inside = asyncio.Event()

        async def flaky(session: AsyncSession) -> str:
            attempts.append(len(attempts))
            await record(session, "k", "A", len(attempts))
            inside.set()
            if len(attempts) < 3:
                await session.execute(text(SERIALIZATION_FAILURE))  # a real 40001 from Postgres
            return "done"

        first = ser.submit(flaky, key="k", writer="A")
        await inside.wait()
        second = ser.submit(record, "k", "B", 99, key="k", writer="B")
        assert await first == "done" and await second
        assert first.outcome is Outcome.COMMITTED and len(attempts) == 3
        # The retries kept A's place: B, queued meanwhile, still came after it.
        assert [(r[2], r[3]) for r in await ledger(ser.engine)] == [("A", 3), ("B", 99)]
        assert ser.stats().retries == 2
        assert await pg_leftovers(ser.engine) == (0, 0)


@pytest.mark.postgres
async def test_retries_run_out(pg_url: str) -> None:
    async with serializer(pg_url, retry_backoff=0) as ser:
        await create_tables(ser.engine)
        calls = 0

        async def always(session: AsyncSession) -> None:
            nonlocal calls
            calls += 1
            await session.execute(text(SERIALIZATION_FAILURE))

        with pytest.raises(DBAPIError, match="conflict"):
            await ser.run(always, key="k", retries=2)
        assert calls == 3
        with pytest.raises(DBAPIError):
            await ser.run(always, key="k")  # the serializer's default: no retries
        assert calls == 4


@pytest.mark.postgres
async def test_a_connection_lost_before_commit_is_retried_on_a_new_one(pg_url: str) -> None:
    async with serializer(pg_url, retries=1, retry_backoff=0) as ser:
        await create_tables(ser.engine)
        pids: list[int] = []

        async def write(session: AsyncSession) -> None:
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            pids.append(pid)
            await record(session, "k", "w", len(pids))
            if len(pids) == 1:
                await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

        handle = ser.submit(write, key="k")
        await handle
        assert handle.outcome is Outcome.COMMITTED
        assert len(pids) == 2 and pids[0] != pids[1]
        assert [r[3] for r in await ledger(ser.engine)] == [2]
        assert ser.stats().connections_invalidated == 1


async def test_an_ordinary_error_is_not_retried(db_url: str) -> None:
    async with serializer(db_url, retries=5) as ser:
        await create_tables(ser.engine)
        calls = 0

        async def fails(session: AsyncSession) -> None:
            nonlocal calls
            calls += 1
            raise ValueError("a bug, not a conflict")

        with pytest.raises(ValueError):
            await ser.run(fails, key="k")
        assert calls == 1 and ser.stats().retries == 0


async def test_sqlite_busy_from_another_process_is_retried(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    url = f"sqlite+aiosqlite:///{path}"
    async with serializer(url, sqlite_busy_timeout=0.05, retries=20, retry_backoff=0.02) as ser:
        await create_tables(ser.engine)
        held, release = threading.Event(), threading.Event()

        def other_writer() -> None:  # another process's connection, holding the write lock
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            held.set()
            release.wait(10)
            conn.execute("ROLLBACK")
            conn.close()

        thread = threading.Thread(target=other_writer)
        thread.start()
        try:
            await asyncio.to_thread(held.wait, 10)
            handle = ser.submit(record, "k", "w", 1, key="k")
            await asyncio.sleep(0.3)
            assert not handle.done()  # still retrying behind the other writer
        finally:
            release.set()
            await asyncio.to_thread(thread.join, 10)
        await handle
        assert handle.outcome is Outcome.COMMITTED and ser.stats().retries >= 1


@pytest.mark.postgres
async def test_cancelled_while_waiting_to_retry(pg_url: str) -> None:
    async with serializer(pg_url, retries=5, retry_backoff=5.0) as ser:
        await create_tables(ser.engine)
        failed = asyncio.Event()

        async def conflict(session: AsyncSession) -> None:
            failed.set()
            await session.execute(text(SERIALIZATION_FAILURE))

        handle = ser.submit(conflict, key="k")
        behind = ser.submit(record, "k", "next", 1, key="k")
        await failed.wait()
        await asyncio.sleep(0.05)  # now in the back-off
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        assert handle.outcome is Outcome.ROLLED_BACK
        await asyncio.wait_for(behind, 5)  # the turn passed on at once
        assert [r[3] for r in await ledger(ser.engine)] == [1]


def test_retries_must_be_a_count(tmp_path: Path) -> None:
    from writeturn import ConfigurationError, WriteSerializer

    with pytest.raises(ConfigurationError, match="retries=-1"):
        WriteSerializer.from_url(f"sqlite:///{tmp_path / 'x.db'}", retries=-1)
