"""A cancellation storm: thousands of writes, a third of them cancelled at random moments.

Afterwards every guarantee is checked against the database itself: the
counter, the ledger, and on Postgres ``pg_locks`` and ``pg_stat_activity``;
during the storm each write on Postgres probes, with a NOWAIT row lock, that
no other write's transaction is still open.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome, TurnTimeout, WriteHandle, WriteSerializer

from ._db import counter, create_tables, increment, ledger, pg_leftovers, record, serializer

WRITERS = 8
WRITES_PER_WRITER = 300
SEED = 20261125
LOCK_NOT_AVAILABLE = "55P03"  # what a NOWAIT lock request gets when the lock is held


@dataclass
class Storm:
    ser: WriteSerializer
    rnd: random.Random
    handles: dict[tuple[str, int], WriteHandle[Any]] = field(default_factory=dict)
    plans: dict[tuple[str, int], str] = field(default_factory=dict)
    in_flight: int = 0
    peak: int = 0
    overlaps_seen_by_db: int = 0
    waiters: list[asyncio.Task[Any]] = field(default_factory=list)

    async def write(self, session: AsyncSession, writer: str, seq: int) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.plans[(writer, seq)] == "running":
                # Land the cancellation somewhere inside this write: a statement,
                # a pause, the flush, or COMMIT itself.
                loop = asyncio.get_running_loop()
                loop.call_later(self.rnd.uniform(0, 0.004), self.handles[(writer, seq)].cancel)
            self.overlaps_seen_by_db += await key_row_held_by_another(session)
            await increment(session, pause=self.rnd.choice((0, 0, 0.001)))
            await asyncio.sleep(self.rnd.choice((0, 0.0005)))
            await record(session, "k", writer, seq)
        finally:
            self.in_flight -= 1

    async def writer(self, name: str) -> None:
        seq = 0
        while seq < WRITES_PER_WRITER:
            for _ in range(self.rnd.randint(1, 25)):  # a burst queued at once
                if seq == WRITES_PER_WRITER:
                    break
                self.submit(name, seq)
                seq += 1
            await asyncio.sleep(self.rnd.uniform(0, 0.01))

    def submit(self, name: str, seq: int) -> None:
        plan = self.rnd.choices(
            ("none", "queued", "running", "task", "timeout"), weights=(6, 1, 1, 0.6, 0.4)
        )[0]
        self.plans[(name, seq)] = plan
        timeout = self.rnd.uniform(0.001, 0.05) if plan == "timeout" else None
        handle = self.ser.submit(self.write, name, seq, key="k", writer=name, timeout=timeout)
        self.handles[(name, seq)] = handle
        loop = asyncio.get_running_loop()
        if plan == "queued":
            loop.call_later(self.rnd.uniform(0, 0.002), handle.cancel)
        waiter = asyncio.ensure_future(settle(handle))
        self.waiters.append(waiter)
        if plan == "task":
            loop.call_later(self.rnd.uniform(0, 0.05), waiter.cancel)


async def settle(handle: WriteHandle[Any]) -> None:
    try:
        await handle
    except (asyncio.CancelledError, TurnTimeout):
        pass


async def key_row_held_by_another(session: AsyncSession) -> int:
    """1 if another transaction still holds key "k"'s counter row, else 0 (Postgres only).

    Every write updates that row, so a write that overlaps another finds it locked.
    Exclusion is probed with the lock itself: a transaction's row lock ends exactly
    when the transaction is over, while ``pg_stat_activity.xact_start`` is cleared
    only after its locks were released, so counting open transactions would see the
    committed predecessor of a write woken by the advisory lock.
    """
    if session.bind.dialect.name != "postgresql":
        return 0
    try:
        await session.execute(
            text("SELECT n FROM counter WHERE key = :k FOR UPDATE NOWAIT"), {"k": "k"}
        )
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        return 1  # counted; the write then fails, as the transaction was aborted
    return 0


async def run_storm(ser: WriteSerializer) -> Storm:
    """Run the storm to the end on ``ser`` (its tables already made)."""
    storm = Storm(ser, random.Random(SEED))
    async with asyncio.timeout(240):
        await asyncio.gather(*(storm.writer(f"w{i}") for i in range(WRITERS)))
        await asyncio.gather(*storm.waiters, return_exceptions=True)
    return storm


async def check_storm(ser: WriteSerializer, storm: Storm) -> None:
    """Every guarantee, checked against the database after a storm."""
    handles = storm.handles
    assert all(h.done() for h in handles.values())
    outcomes = Counter(h.outcome for h in handles.values())
    committed = {k for k, h in handles.items() if h.outcome is Outcome.COMMITTED}

    # The storm reached every phase.
    assert outcomes[Outcome.WITHDRAWN] > 50, outcomes
    assert outcomes[Outcome.ROLLED_BACK] > 50, outcomes
    assert outcomes[Outcome.UNKNOWN] == 0, outcomes
    assert sum(p != "none" for p in storm.plans.values()) > len(handles) // 4

    # Mutual exclusion, and no lost update.
    assert storm.peak == 1
    assert storm.overlaps_seen_by_db == 0
    rows = await ledger(ser.engine)
    assert await counter(ser.engine) == len(committed) == len(rows)

    # Outcome truth: exactly the COMMITTED writes are in the database.
    assert {(r[2], r[3]) for r in rows} == committed

    # Order: per writer, writes committed in submission order.
    for i in range(WRITERS):
        seqs = [r[3] for r in rows if r[2] == f"w{i}"]
        assert seqs == sorted(seqs)

    # Nothing is left behind, and the cancellations cost no reconnects.
    stats = ser.stats()
    assert (stats.queued, stats.running) == (0, 0)
    assert stats.committed == outcomes[Outcome.COMMITTED]
    assert stats.rolled_back == outcomes[Outcome.ROLLED_BACK]
    assert stats.withdrawn == outcomes[Outcome.WITHDRAWN]
    assert stats.connections_invalidated <= stats.cancel_requests / 100
    assert await pg_leftovers(ser.engine) == (0, 0)

    # The serializer still writes after the storm.
    await ser.run(record, "k", "after", 0, key="k", timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_cancellation_storm_keeps_every_guarantee(db_url: str, coordination: str) -> None:
    async with serializer(db_url, coordination=coordination) as ser:
        await create_tables(ser.engine)
        await check_storm(ser, await run_storm(ser))
