"""Group commit meets SQLite busy: a batch's BEGIN fails like a single write's BEGIN.

Another process holds SQLite's write lock past ``sqlite_busy_timeout``, so the
BEGIN IMMEDIATE of a batch fails with "database is locked". The writes of the
batch must end as they would one by one: retried (with their own ``retries``
and back-off) and committed once the other process lets go, or, without
retries, failed with the same outcome and exception as a single write.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import ConnectionLost, Outcome, TurnTimeout
from writeturn.dialects import lock_id

from ._db import create_tables, ledger, quietly, record, serializer
from .test_connections import _asyncpg_kwargs
from .test_sqlite_busy import hold_write_lock

BUSY = 0.25  # sqlite_busy_timeout: the other process holds the lock longer than this
WRITES = 5


async def test_a_batch_whose_begin_meets_another_process_lock_retries(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    sessions: list[int] = []

    async def write(session: AsyncSession, seq: int) -> int:
        sessions.append(id(session))
        return await record(session, "k", "w", seq)

    async with (
        asyncio.timeout(60),
        serializer(
            f"sqlite:///{path}",
            batch_max=16,
            retries=3,
            retry_backoff=0.1,
            sqlite_busy_timeout=BUSY,
        ) as ser,
    ):
        await create_tables(ser.engine)
        holder = await hold_write_lock(path, 0.6)
        handles = [ser.submit(write, i, key="k", timeout=20) for i in range(WRITES)]
        results = [await quietly(h) for h in handles]
        await asyncio.wait_for(holder.wait(), 10)
        assert holder.returncode == 0
        assert [h.outcome for h in handles] == [Outcome.COMMITTED] * WRITES, results
        assert all(isinstance(r, int) for r in results), results
        assert ser.stats().retries >= WRITES  # the whole batch ran again at least once
        assert len(sessions) == WRITES and len(set(sessions)) == 1  # one transaction
        assert sorted(r[3] for r in await ledger(ser.engine)) == list(range(WRITES))


async def _fail_behind_lock(path: Path, batch_max: int) -> list[tuple[Outcome, type[Any]]]:
    """Writes without retries while another process holds the lock throughout."""
    async with (
        asyncio.timeout(60),
        serializer(f"sqlite:///{path}", batch_max=batch_max, sqlite_busy_timeout=BUSY) as ser,
    ):
        holder = await hold_write_lock(path, WRITES * BUSY + 3.0)
        try:
            handles = [ser.submit(record, "k", "w", i, key="k") for i in range(3)]
            errors = [await quietly(h) for h in handles]
        finally:
            holder.kill()
            await holder.wait()
        assert await ledger(ser.engine) == []
        return [(h.outcome, type(e)) for h, e in zip(handles, errors, strict=True)]


async def test_a_batch_whose_begin_fails_without_retries_ends_as_single_writes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.db"
    async with serializer(f"sqlite:///{path}") as ser:
        await create_tables(ser.engine)
    single = await _fail_behind_lock(path, batch_max=1)
    batched = await _fail_behind_lock(path, batch_max=16)
    assert all(o is not Outcome.COMMITTED for o, _ in single), single
    assert batched == single


async def test_a_retrying_batch_still_stops_each_write_at_once(tmp_path: Path) -> None:
    """While the batch waits for the lock and retries, a write's own timeout and a
    cancel end that write at once (not when the BEGIN gives up); the others commit."""
    path = tmp_path / "b.db"
    async with (
        asyncio.timeout(60),
        serializer(
            f"sqlite:///{path}", batch_max=16, retries=5, retry_backoff=0.1, sqlite_busy_timeout=1.0
        ) as ser,
    ):
        await create_tables(ser.engine)
        loop = asyncio.get_running_loop()
        holder = await hold_write_lock(path, 2.5)
        t0 = loop.time()
        kept = [ser.submit(record, "k", "kept", i, key="k", timeout=30) for i in (0, 2)]
        timed_out = ser.submit(record, "k", "timed out", 1, key="k", timeout=0.4)
        cancelled = ser.submit(record, "k", "cancelled", 3, key="k", timeout=30)
        with pytest.raises(TurnTimeout):
            await timed_out
        assert loop.time() - t0 < 0.4 + 0.5  # during the first BEGIN's 1 s busy wait
        assert timed_out.outcome is Outcome.WITHDRAWN  # stopped before its function ran
        await asyncio.sleep(1.5 - (loop.time() - t0))  # the second BEGIN waits now
        assert ser.stats().retries >= 3  # the batch's BEGIN failed once and is retried
        stopped_at = loop.time()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert loop.time() - stopped_at < 0.5
        # As a single write stopped while waiting to run again: its first attempt rolled back.
        assert cancelled.outcome is Outcome.ROLLED_BACK
        assert [await h for h in kept] == [1, 2]
        assert [h.outcome for h in kept] == [Outcome.COMMITTED] * 2
        await asyncio.wait_for(holder.wait(), 10)
        assert [r[2:] for r in await ledger(ser.engine)] == [("kept", 0), ("kept", 2)]


# A session of this test's database waiting for an advisory lock (the server is shared).
WAITING_FOR_THE_LOCK = (
    "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
    "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
)


async def _begin_cut_twice(pg_url: str, batch_max: int, retries: int) -> list[tuple[Outcome, Any]]:
    """Postgres, advisory mode: another session holds the key's lock, and the
    connection whose BEGIN waits for it is terminated twice (BEGIN replaces a
    dead connection once, so the second cut fails the BEGIN); then the lock is
    let go. Returns each write's (outcome, exception type or None)."""
    async with (
        asyncio.timeout(60),
        serializer(pg_url, coordination="advisory", batch_max=batch_max, retries=retries) as ser,
    ):
        other = await asyncpg.connect(**_asyncpg_kwargs(pg_url))
        try:
            await other.execute("SELECT pg_advisory_lock($1)", lock_id("writeturn", "k"))
            handles = [ser.submit(record, "k", "w", i, key="k") for i in range(3)]
            for _ in range(2):
                pid = None
                while pid is None:
                    await asyncio.sleep(0.02)
                    pid = await other.fetchval(WAITING_FOR_THE_LOCK)
                # With a timeout, pg_terminate_backend returns once the backend is gone.
                assert await other.fetchval(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE pid = $1 AND datname = current_database()",
                    pid,
                )
            await asyncio.sleep(0.3)  # the BEGIN failed; a retry waits for the lock again
            await other.execute("SELECT pg_advisory_unlock_all()")
            errors = [await quietly(h) for h in handles]
        finally:
            await other.close()
        assert ser.stats().connections_invalidated >= 2
        return [
            (h.outcome, None if h.outcome is Outcome.COMMITTED else type(e))
            for h, e in zip(handles, errors, strict=True)
        ]


@pytest.mark.postgres
async def test_a_batch_whose_begin_loses_its_connection_ends_as_single_writes(
    pg_url: str,
) -> None:
    async with serializer(pg_url) as ser:
        await create_tables(ser.engine)
    single = await _begin_cut_twice(pg_url, batch_max=1, retries=0)
    assert single[0] == (Outcome.ROLLED_BACK, ConnectionLost), single
    batched = await _begin_cut_twice(pg_url, batch_max=16, retries=0)
    assert batched == [single[0]] * 3, batched


@pytest.mark.postgres
async def test_a_batch_whose_begin_loses_its_connection_retries(pg_url: str) -> None:
    async with serializer(pg_url) as ser:
        await create_tables(ser.engine)
    batched = await _begin_cut_twice(pg_url, batch_max=16, retries=2)
    assert batched == [(Outcome.COMMITTED, None)] * 3, batched
