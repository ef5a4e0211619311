"""A storm that mixes every way of writing: submitted writes with retries, group commit,
and ``transaction()`` blocks, on three keys, with a third of the writes stopped at random
moments (queued, running, by their awaiting task, by their timeout).

A probe inside every write function and every block checks mutual exclusion where it
matters, in the code that runs while the key is held: a second writer inside the same
key is a failure. Afterwards the database itself is compared with every outcome.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome, WriteHandle, WriteSerializer, WriteturnError

from ._db import create_tables, pg_leftovers, serializer

KEYS = ("a", "b", "c")
WRITERS = 6
WRITES_PER_WRITER = 120
SEED = 20261201


@dataclass
class Mixed:
    ser: WriteSerializer
    rnd: random.Random
    postgres: bool
    inside: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KEYS})
    overlaps: list[str] = field(default_factory=list)
    handles: dict[str, WriteHandle[Any]] = field(default_factory=dict)
    flaky: set[str] = field(default_factory=set)  # fail once with a serialization failure
    failed_once: set[str] = field(default_factory=set)
    stop_inside: set[str] = field(default_factory=set)  # cancelled from inside, at random
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def body(self, session: AsyncSession, key: str, name: str) -> None:
        """What every write does while it holds ``key``: probe, count, record."""
        if self.inside[key]:
            self.overlaps.append(f"{name} entered {key} while {self.inside[key]} inside")
        self.inside[key].append(name)
        if name in self.stop_inside:
            # Land the cancel somewhere in this write: a statement, a pause, the
            # flush, or COMMIT itself.
            loop = asyncio.get_running_loop()
            loop.call_later(self.rnd.uniform(0, 0.003), self.handles[name].cancel)
        try:
            n = (
                await session.execute(text("SELECT n FROM counter WHERE key = :k"), {"k": key})
            ).scalar_one()
            await asyncio.sleep(self.rnd.choice((0, 0, 0.0005)))
            if name in self.flaky and name not in self.failed_once:
                self.failed_once.add(name)
                await session.execute(
                    text("DO $$ BEGIN RAISE EXCEPTION 'write skew' USING ERRCODE = '40001'; END $$")
                )
            await session.execute(
                text("UPDATE counter SET n = :n WHERE key = :k"), {"n": n + 1, "k": key}
            )
            await session.execute(
                text("INSERT INTO ledger (key, writer, seq) VALUES (:k, :w, 0)"),
                {"k": key, "w": name},
            )
        finally:
            self.inside[key].remove(name)

    async def block(self, key: str, name: str, timeout: float | None, stop: str) -> None:
        """One write as a transaction() block in this task."""
        ctx = self.ser.transaction(key=key, writer=name.split(":")[0], timeout=timeout)
        self.handles[name] = ctx.handle
        if stop == "queued":
            asyncio.get_running_loop().call_later(self.rnd.uniform(0, 0.002), ctx.handle.cancel)
        async with ctx as session:
            if stop == "running":
                asyncio.get_running_loop().call_later(self.rnd.uniform(0, 0.003), ctx.handle.cancel)
            await self.body(session, key, name)

    def submit(self, key: str, name: str, timeout: float | None, stop: str) -> None:
        writer = name.split(":")[0]
        h = self.ser.submit(self.body, key, name, key=key, writer=writer, timeout=timeout)
        self.handles[name] = h
        loop = asyncio.get_running_loop()
        if stop == "queued":
            loop.call_later(self.rnd.uniform(0, 0.002), h.cancel)
        waiter = asyncio.ensure_future(_quiet(h))
        self.tasks.append(waiter)
        if stop == "task":
            loop.call_later(self.rnd.uniform(0, 0.02), waiter.cancel)

    async def writer(self, w: int) -> None:
        i = 0
        while i < WRITES_PER_WRITER:
            for _ in range(self.rnd.randint(1, 12)):  # a burst
                if i == WRITES_PER_WRITER:
                    break
                name = f"w{w}:{i}"
                i += 1
                key = self.rnd.choice(KEYS)
                stop = self.rnd.choices(
                    ("none", "queued", "running", "task", "timeout"), weights=(6, 1, 1, 1, 1)
                )[0]
                timeout = self.rnd.uniform(0.002, 0.03) if stop == "timeout" else None
                if stop == "running":
                    self.stop_inside.add(name)
                if self.postgres and self.rnd.random() < 0.15:
                    self.flaky.add(name)
                if self.rnd.random() < 0.25:
                    task = asyncio.ensure_future(_quiet(self.block(key, name, timeout, stop)))
                    self.tasks.append(task)
                    if stop == "task":
                        asyncio.get_running_loop().call_later(
                            self.rnd.uniform(0, 0.02), task.cancel
                        )
                else:
                    self.submit(key, name, timeout, stop)
            await asyncio.sleep(self.rnd.uniform(0, 0.004))


async def _quiet(aw: Any) -> None:
    try:
        await aw
    except (asyncio.CancelledError, TimeoutError, WriteturnError):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_a_mixed_storm_keeps_one_writer_per_key_and_true_outcomes(
    db_url: str, coordination: str
) -> None:
    postgres = db_url.startswith("postgresql")
    async with serializer(
        db_url,
        coordination=coordination,
        batch_max=8,
        batch_window=0.001,
        retries=2,
        retry_backoff=0.002,
    ) as ser:
        await create_tables(ser.engine, *KEYS)
        storm = Mixed(ser, random.Random(SEED), postgres)
        async with asyncio.timeout(240):
            await asyncio.gather(*(storm.writer(w) for w in range(WRITERS)))
            while storm.tasks:
                tasks, storm.tasks = storm.tasks, []
                await asyncio.gather(*tasks, return_exceptions=True)

        handles = storm.handles
        assert len(handles) == WRITERS * WRITES_PER_WRITER
        assert all(h.done() for h in handles.values())
        outcomes = Counter(h.outcome for h in handles.values())
        assert storm.overlaps == []
        # The storm reached every ending, and retries happened where failures were injected.
        assert outcomes[Outcome.WITHDRAWN] > 20, outcomes
        assert outcomes[Outcome.ROLLED_BACK] > 20, outcomes
        assert outcomes[Outcome.UNKNOWN] == 0, outcomes
        stats = ser.stats()
        if postgres:
            assert stats.retries > 0
        committed = {n for n, h in handles.items() if h.outcome is Outcome.COMMITTED}

        async with ser.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT key, writer FROM ledger"))).all()
            counters = {k: n for k, n in await conn.execute(text("SELECT key, n FROM counter"))}
        # Outcome truth: exactly the COMMITTED writes are in the database, once each.
        writers = [w for _, w in rows]
        assert len(writers) == len(set(writers))
        assert set(writers) == committed
        # No lost update: each key's counter equals its ledger rows.
        per_key = Counter(k for k, _ in rows)
        assert counters == {k: per_key[k] for k in KEYS}
        # The serializer agrees, and nothing is left behind.
        assert stats.committed == outcomes[Outcome.COMMITTED]
        assert stats.rolled_back == outcomes[Outcome.ROLLED_BACK]
        assert stats.withdrawn == outcomes[Outcome.WITHDRAWN]
        assert (stats.queued, stats.running) == (0, 0)
        assert await pg_leftovers(ser.engine) == (0, 0)
