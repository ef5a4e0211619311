"""Behind a real PgBouncer in transaction pooling mode (a small server pool of 4):
exact counts from several processes, stops that need no server connection, a full pool,
and the migration lock refused through the pooler and taken around it."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import (
    ConfigurationError,
    Outcome,
    TurnTimeout,
    WriteHandle,
    WriteSerializer,
    migrations,
)

from ._db import counter, create_tables, ledger, pg_leftovers, record, serializer
from ._pgbouncer import POOL, running_pgbouncer
from .test_connections import _asyncpg_kwargs
from .test_processes import PROCESSES, TASKS, WRITES, run_processes

pytestmark = pytest.mark.postgres
SEED = 20261201


@pytest.fixture
def bouncer_url(pg_url: str) -> Iterator[str]:
    """``pg_url``'s database, reached through a PgBouncer of its own."""
    with running_pgbouncer(pg_url) as url:
        yield url


async def test_a_serializer_not_told_of_the_pooler_refuses_to_start(
    pg_url: str, bouncer_url: str
) -> None:
    ser = WriteSerializer.from_url(bouncer_url)
    with pytest.raises(ConfigurationError, match="pgbouncer=True"):
        await ser.start()
    await ser.close()
    # Told, it starts; and told on a direct connection, it starts too.
    async with WriteSerializer.from_url(bouncer_url, pgbouncer=True) as ser:
        assert ser.stats().committed == 0
    async with WriteSerializer.from_url(pg_url, pgbouncer=True):
        pass


@pytest.mark.slow
async def test_processes_through_the_pooler_count_exactly(
    pg_url: str, bouncer_url: str, tmp_path: Path
) -> None:
    committed = await run_processes(pg_url, "advisory", tmp_path, through=bouncer_url)
    assert committed == PROCESSES * TASKS * WRITES
    async with serializer(pg_url) as ser:
        assert await counter(ser.engine) == committed
        assert await pg_leftovers(ser.engine) == (0, 0)


async def test_a_hung_statement_times_out_promptly_and_keeps_its_connection(
    pg_url: str, bouncer_url: str
) -> None:
    cleanup = 5.0
    async with serializer(pg_url) as direct:
        await create_tables(direct.engine)
    blocker = await asyncpg.connect(**_asyncpg_kwargs(pg_url))
    try:
        await blocker.execute("BEGIN; UPDATE counter SET n = n WHERE key = 'k'")

        async def stuck(session: AsyncSession) -> None:
            await session.execute(text("UPDATE counter SET n = n + 1 WHERE key = 'k'"))

        async with (
            asyncio.timeout(60),
            WriteSerializer.from_url(bouncer_url, pgbouncer=True, cleanup_timeout=cleanup) as ser,
        ):
            t0 = time.monotonic()
            with pytest.raises(TurnTimeout):
                await ser.run(stuck, key="k", timeout=0.5)
            took = time.monotonic() - t0
            print(f"\nhung statement through PgBouncer, timeout=0.5: TurnTimeout after {took:.2f}s")
            assert took < cleanup / 2, f"took {took:.2f}s"  # interrupted, not cut off
            assert ser.stats().connections_invalidated == 0
            assert ser.stats().interrupts >= 1
            await blocker.execute("ROLLBACK")
            t0 = time.monotonic()
            await ser.run(stuck, key="k", timeout=10)
            assert time.monotonic() - t0 < cleanup / 2
    finally:
        await blocker.close()


async def test_a_write_cancelled_while_lock_waiters_fill_the_pool(
    pg_url: str, bouncer_url: str
) -> None:
    """One serializer holds the key; one per remaining server connection waits for its
    advisory lock, so the pooler has no connection left. Cancelling a waiter must not
    need one, and once the key is free everyone settles at once."""
    async with serializer(pg_url) as direct:
        await create_tables(direct.engine)
    sers = [WriteSerializer.from_url(bouncer_url, pgbouncer=True) for _ in range(POOL)]
    async with asyncio.timeout(60):
        for ser in sers:
            await ser.start()
        try:
            release = asyncio.Event()

            async def hold(session: AsyncSession) -> None:
                await record(session, "k", "holder", 0)
                await release.wait()

            async def wait(session: AsyncSession, i: int) -> None:
                await record(session, "k", f"waiter{i}", i)

            holder = sers[0].submit(hold, key="k")
            await asyncio.sleep(0.3)
            waiters = [ser.submit(wait, i, key="k") for i, ser in enumerate(sers[1:], 1)]
            await asyncio.sleep(0.5)  # they now wait in pg_advisory_xact_lock, pool full
            t0 = time.monotonic()
            waiters[0].cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiters[0]
            cancelled_in = time.monotonic() - t0
            assert waiters[0].outcome is Outcome.ROLLED_BACK
            release.set()
            t0 = time.monotonic()
            await holder
            await asyncio.gather(*waiters[1:])
            rest_in = time.monotonic() - t0
            # Both well under a second-scale stall (query_wait_timeout is 20 s here).
            assert cancelled_in < 2.0 and rest_in < 2.0, (cancelled_in, rest_in)
            writers = [r[2] for r in await ledger(sers[0].engine)]
            assert writers[0] == "holder" and sorted(writers[1:]) == ["waiter2", "waiter3"]
            assert all(ser.stats().connections_invalidated == 0 for ser in sers)
        finally:
            for ser in sers:
                await ser.close()


@pytest.mark.slow
async def test_a_cancellation_storm_through_the_pooler(pg_url: str, bouncer_url: str) -> None:
    """Four serializers (as four processes would) write the same keys through the
    pooler, a third of the writes cancelled at random: their lock waiters hold the
    pooler's server connections, which is where an interrupt that needs one stalls."""
    rnd = random.Random(SEED)
    keys = ("a", "b", "c")
    async with serializer(pg_url) as direct:
        await create_tables(direct.engine, *keys)
    settled_at: list[float] = []
    handles: dict[tuple[str, int], WriteHandle[Any]] = {}
    timeout = 2.0
    sers = [WriteSerializer.from_url(bouncer_url, pgbouncer=True) for _ in range(4)]
    async with asyncio.timeout(120):
        for ser in sers:
            await ser.start()
        try:

            async def write(session: AsyncSession, key: str, i: int) -> None:
                await session.execute(
                    text("UPDATE counter SET n = n + 1 WHERE key = :k"), {"k": key}
                )
                await asyncio.sleep(rnd.choice((0, 0.001, 0.005)))
                await record(session, key, None, i)

            async def watch(h: WriteHandle[Any]) -> None:
                try:
                    await h
                except (asyncio.CancelledError, TurnTimeout):
                    pass
                settled_at.append(time.monotonic())

            loop = asyncio.get_running_loop()
            watchers = []
            start = time.monotonic()
            for i in range(300):
                key = rnd.choice(keys)
                ser = sers[i % len(sers)]
                h = ser.submit(write, key, i, key=key, writer=f"w{i % 6}", timeout=timeout)
                handles[(key, i)] = h
                if rnd.random() < 1 / 3:
                    loop.call_later(rnd.uniform(0, 0.02), h.cancel)
                watchers.append(asyncio.ensure_future(watch(h)))
                if i % 10 == 0:
                    await asyncio.sleep(rnd.uniform(0, 0.01))
            await asyncio.gather(*watchers)
            moments = sorted([start, *settled_at])
            stall = max(b - a for a, b in itertools.pairwise(moments))
            print(f"\nstorm through PgBouncer: longest time with no write settling {stall:.3f}s")
            assert stall < timeout, f"every write stalled for {stall:.2f}s"
            outcomes = {h.outcome for h in handles.values()}
            assert Outcome.UNKNOWN not in outcomes
            committed = {k for k, h in handles.items() if h.outcome is Outcome.COMMITTED}
            rows = await ledger(sers[0].engine)
            assert {(r[1], r[3]) for r in rows} == committed
            assert 0 < len(committed) < len(handles)
            assert sum(ser.stats().connections_invalidated for ser in sers) == 0
            assert await pg_leftovers(sers[0].engine) == (0, 0)
        finally:
            for ser in sers:
                await ser.close()


async def test_the_migration_lock_is_refused_through_the_pooler_and_taken_around_it(
    pg_url: str, bouncer_url: str
) -> None:
    with pytest.raises(ConfigurationError, match="direct connection"):
        await migrations.upgrade_async(bouncer_url)
    await migrations.upgrade_async(pg_url)
    async with serializer(pg_url) as direct:
        await create_tables(direct.engine)
    async with WriteSerializer.from_url(bouncer_url, pgbouncer=True, journal=True) as ser:
        h = ser.submit(record, "k", "journaled", 1, key="k")
        await h
        assert h.seq == 1
