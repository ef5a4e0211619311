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

from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome

from ._db import create_tables, ledger, quietly, record, serializer
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
