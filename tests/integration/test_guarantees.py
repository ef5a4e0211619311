"""Each guarantee of WriteSerializer, checked against the real database (SQLite and Postgres)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import (
    Outcome,
    ReentrantWriteError,
    TransactionOwnedError,
    TurnTimeout,
    WriteSerializer,
)

from ._db import (
    counter,
    create_tables,
    increment,
    increment_concurrently,
    ledger,
    pg_leftovers,
    quietly,
    record,
    serializer,
)

COORDINATIONS = ["turn", "advisory"]


class Blocker:
    """Holds a key's turn until released, so that writes can be queued behind it."""

    def __init__(self, ser: WriteSerializer, key: str = "k") -> None:
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.handle = ser.submit(self._hold, key=key, writer="blocker")

    async def _hold(self, session: AsyncSession) -> None:
        self.started.set()
        await self.gate.wait()

    async def __aenter__(self) -> Blocker:
        await asyncio.wait_for(self.started.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.gate.set()
        await self.handle


async def test_commit_returns_result(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        handle = ser.submit(record, "k", "w", 1, key="k", writer="w")
        assert handle.outcome is Outcome.PENDING
        row_id = await handle
        assert handle.outcome is Outcome.COMMITTED and handle.done()
        assert await ledger(ser.engine) == [(row_id, "k", "w", 1)]
        assert ser.stats().committed == 1


async def test_exception_rolls_back_and_turn_passes_on(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)

        async def fails(session: AsyncSession) -> None:
            await record(session, "k", "w", 1)
            raise LookupError("boom")

        bad = ser.submit(fails, key="k")
        good = ser.submit(record, "k", "w", 2, key="k")
        with pytest.raises(LookupError, match="boom"):
            await bad
        await good
        assert bad.outcome is Outcome.ROLLED_BACK
        assert good.outcome is Outcome.COMMITTED
        assert [r[3] for r in await ledger(ser.engine)] == [2]
        assert await pg_leftovers(ser.engine) == (0, 0)


@pytest.mark.parametrize("coordination", COORDINATIONS)
async def test_alternation_recorded_in_commit_order(db_url: str, coordination: str) -> None:
    async with serializer(db_url, coordination=coordination) as ser:
        await create_tables(ser.engine)
        handles = []
        async with Blocker(ser):
            # A queues a burst of 5, then B 5, then C 3: turns must rotate.
            for writer, count in (("A", 5), ("B", 5), ("C", 3)):
                for i in range(count):
                    handles.append(ser.submit(record, "k", writer, i, key="k", writer=writer))
            assert ser.key_statistics("k").writers == ("A", "B", "C")
        await asyncio.gather(*handles)
        order = "".join(r[2] for r in await ledger(ser.engine))
        assert order == "ABCABCABCABAB"
        for writer in "ABC":
            seqs = [r[3] for r in await ledger(ser.engine) if r[2] == writer]
            assert seqs == sorted(seqs)


async def test_anonymous_writes_run_in_arrival_order(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        async with Blocker(ser):
            handles = [ser.submit(record, "k", None, i, key="k") for i in range(8)]
            named = ser.submit(record, "k", "N", 100, key="k", writer="N")
        await asyncio.gather(*handles, named)
        seqs = [r[3] for r in await ledger(ser.engine)]
        # The named writer arrived last and takes its turn in the rotation after them.
        assert seqs == [*range(8), 100]


@pytest.mark.parametrize("coordination", COORDINATIONS)
async def test_concurrent_increments_lose_nothing(db_url: str, coordination: str) -> None:
    async with serializer(db_url, coordination=coordination) as ser:
        await create_tables(ser.engine)
        await increment_concurrently(ser)
        assert await counter(ser.engine) == 500
        assert ser.stats().committed == 500


async def test_without_writeturn_the_same_increments_lose_updates(db_url: str) -> None:
    """The control: plain concurrent sessions on the same workload lose updates or fail."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(db_url.replace("sqlite+aiosqlite", "sqlite+aiosqlite"))
    try:
        await create_tables(engine)
        failures = 0

        async def task() -> None:
            nonlocal failures
            for _ in range(10):
                try:
                    async with AsyncSession(engine) as session, session.begin():
                        await increment(session)
                except Exception:
                    failures += 1

        await asyncio.gather(*(task() for _ in range(50)))
        # Every failed or overwritten increment is a lost update.
        assert await counter(engine) < 500
    finally:
        await engine.dispose()


async def test_one_transaction_per_key_at_a_time(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine, "k1", "k2")
        in_flight: dict[str, int] = {"k1": 0, "k2": 0, "all": 0}
        peak: dict[str, int] = dict.fromkeys(in_flight, 0)

        async def write(session: AsyncSession, key: str) -> None:
            for name in (key, "all"):
                in_flight[name] += 1
                peak[name] = max(peak[name], in_flight[name])
            await increment(session, key, pause=0.01)
            for name in (key, "all"):
                in_flight[name] -= 1

        await asyncio.gather(
            *(ser.run(write, k, key=k, writer=f"w{i % 3}") for i in range(12) for k in ("k1", "k2"))
        )
        assert peak["k1"] == peak["k2"] == 1
        if ser.engine.dialect.name == "sqlite":
            assert peak["all"] == 1  # one writer per SQLite database
        else:
            assert peak["all"] == 2  # different keys run in parallel on Postgres
        assert await counter(ser.engine, "k1") == await counter(ser.engine, "k2") == 12


async def test_reentrant_write_raises_at_once(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        async with ser.transaction(key="k") as session:
            await record(session, "k", "outer", 1)
            with pytest.raises(ReentrantWriteError, match="'k'"):
                ser.submit(record, "k", "inner", 2, key="k")
            with pytest.raises(ReentrantWriteError):
                async with ser.transaction(key="k"):
                    pass
            if ser.engine.dialect.name == "sqlite":
                with pytest.raises(ReentrantWriteError, match="single writer"):
                    ser.submit(record, "other", "inner", 3, key="other")
            else:
                other = ser.submit(record, "other", "inner", 3, key="other")
                await asyncio.wait_for(other, 10)

        async def nested(session: AsyncSession) -> None:
            await ser.run(record, "k", "nested", 4, key="k")

        with pytest.raises(ReentrantWriteError):
            await ser.run(nested, key="k")
        assert {r[3] for r in await ledger(ser.engine)} <= {1, 3}


async def test_timeout_while_queued_withdraws(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        async with Blocker(ser):
            late = ser.submit(record, "k", "late", 1, key="k", timeout=0.1)
            started = time.monotonic()
            with pytest.raises(TurnTimeout, match="while queued") as info:
                await late
            assert time.monotonic() - started < 5
            assert isinstance(info.value, TimeoutError)
            assert late.outcome is Outcome.WITHDRAWN
        assert await ledger(ser.engine) == []


async def test_timeout_while_running_rolls_back(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)

        async def slow(session: AsyncSession) -> None:
            await record(session, "k", "slow", 1)
            await asyncio.sleep(30)

        handle = ser.submit(slow, key="k", timeout=0.2)
        with pytest.raises(TurnTimeout, match="while running"):
            await handle
        assert handle.outcome is Outcome.ROLLED_BACK
        await ser.run(record, "k", "next", 2, key="k", timeout=5)
        assert [r[3] for r in await ledger(ser.engine)] == [2]
        assert await pg_leftovers(ser.engine) == (0, 0)


@pytest.mark.parametrize("how", ["asyncio.timeout", "wait_for"])
async def test_asyncio_deadlines_still_raise_timeout_error(db_url: str, how: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)

        async def slow(session: AsyncSession) -> None:
            await record(session, "k", "slow", 1)
            await asyncio.sleep(30)

        task = asyncio.current_task()
        assert task is not None
        with pytest.raises(TimeoutError):
            if how == "wait_for":
                await asyncio.wait_for(ser.run(slow, key="k"), 0.2)
            else:
                async with asyncio.timeout(0.2):
                    await ser.run(slow, key="k")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                async with ser.transaction(key="k") as session:
                    await record(session, "k", "block", 2)
                    await asyncio.sleep(30)
        assert task.cancelling() == 0
        assert await ledger(ser.engine) == []
        assert ser.stats().rolled_back == 2
        assert await pg_leftovers(ser.engine) == (0, 0)


async def test_cancel_queued_write_keeps_the_others_in_order(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        ran: list[int] = []

        async def write(session: AsyncSession, i: int) -> None:
            ran.append(i)
            await record(session, "k", "A", i)

        async with Blocker(ser):
            handles = [ser.submit(write, i, key="k", writer="A") for i in range(6)]
            assert handles[1].cancel() and handles[4].cancel()
        results = [await quietly(h) for h in handles]
        assert [h.outcome for h in handles] == [
            Outcome.COMMITTED,
            Outcome.WITHDRAWN,
            Outcome.COMMITTED,
            Outcome.COMMITTED,
            Outcome.WITHDRAWN,
            Outcome.COMMITTED,
        ]
        assert isinstance(results[1], asyncio.CancelledError)
        assert ran == [0, 2, 3, 5]
        assert [r[3] for r in await ledger(ser.engine)] == [0, 2, 3, 5]
        assert handles[1].cancel() is False  # already done


@pytest.mark.parametrize("coordination", COORDINATIONS)
async def test_cancel_running_write_rolls_back_then_hands_on(
    db_url: str, coordination: str
) -> None:
    async with serializer(db_url, coordination=coordination) as ser:
        await create_tables(ser.engine)
        inside = asyncio.Event()

        async def hold(session: AsyncSession) -> None:
            await record(session, "k", "A", 1)
            inside.set()
            await asyncio.Event().wait()

        first = ser.submit(hold, key="k", writer="A")
        second = ser.submit(record, "k", "B", 2, key="k", writer="B")
        await inside.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await second
        assert (first.outcome, second.outcome) == (Outcome.ROLLED_BACK, Outcome.COMMITTED)
        assert [r[2] for r in await ledger(ser.engine)] == ["B"]
        assert ser.stats().connections_invalidated == 0
        assert await pg_leftovers(ser.engine) == (0, 0)


async def test_cancel_lands_while_a_statement_runs(db_url: str) -> None:
    """The statement is stopped by the driver, not by killing the connection."""
    async with serializer(db_url, cancel_grace=0.05) as ser:
        await create_tables(ser.engine)
        if ser.engine.dialect.name == "sqlite":
            slow_sql = (
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                "WHERE x < 200000000) SELECT count(*) FROM c"
            )
        else:
            slow_sql = "SELECT pg_sleep(20)"
        running = asyncio.Event()

        async def slow(session: AsyncSession) -> None:
            await record(session, "k", "slow", 1)
            running.set()
            await session.execute(text(slow_sql))

        handle = ser.submit(slow, key="k")
        await running.wait()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        assert time.monotonic() - started < 5
        assert handle.outcome is Outcome.ROLLED_BACK
        stats = ser.stats()
        assert stats.interrupts == 1
        assert stats.connections_invalidated == 0
        await ser.run(record, "k", "next", 2, key="k", timeout=5)
        assert [r[3] for r in await ledger(ser.engine)] == [2]
        assert await pg_leftovers(ser.engine) == (0, 0)


@pytest.mark.parametrize("via", ["awaiting task", "handle"])
async def test_cancel_during_commit_lets_the_commit_finish(db_url: str, via: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        box: dict[str, Any] = {}

        def cancel_now(conn: Any) -> None:
            # Runs as COMMIT is about to be sent: the cancellation lands mid-commit.
            if via == "handle":
                box["handle"].cancel()
            else:
                box["task"].cancel()

        async def waiter() -> None:
            box["handle"] = ser.submit(record, "k", "w", 1, key="k")
            await box["handle"]

        event.listen(ser.engine.sync_engine, "commit", cancel_now)
        try:
            box["task"] = asyncio.ensure_future(waiter())
            with pytest.raises(asyncio.CancelledError):
                await box["task"]
        finally:
            event.remove(ser.engine.sync_engine, "commit", cancel_now)
        assert box["handle"].outcome is Outcome.COMMITTED
        assert [r[3] for r in await ledger(ser.engine)] == [1]
        assert await pg_leftovers(ser.engine) == (0, 0)


async def test_transaction_block_commits_and_rolls_back(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        ctx = ser.transaction(key="k", writer="w")
        async with ctx as session:
            await record(session, "k", "w", 1)
        assert ctx.handle.outcome is Outcome.COMMITTED
        with pytest.raises(KeyError):
            async with ser.transaction(key="k") as session:
                await record(session, "k", "w", 2)
                raise KeyError("undo")
        ctx2 = ser.transaction(key="k")
        with pytest.raises(TransactionOwnedError, match="commit"):
            async with ctx2 as session:
                await record(session, "k", "w", 3)
                await session.commit()
        assert ctx2.handle.outcome is Outcome.ROLLED_BACK
        assert [r[3] for r in await ledger(ser.engine)] == [1]


async def test_readers_are_not_blocked_by_a_write(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        inside, release = asyncio.Event(), asyncio.Event()

        async def hold(session: AsyncSession) -> None:
            await increment(session)
            inside.set()
            await release.wait()

        handle = ser.submit(hold, key="k")
        await inside.wait()
        # The engine serves readers directly, beside the open write transaction.
        assert await asyncio.wait_for(counter(ser.engine), 2) == 0
        release.set()
        await handle
        assert await counter(ser.engine) == 1


async def test_sqlite_writes_on_many_keys_never_see_database_locked(sqlite_url: str) -> None:
    async with serializer(sqlite_url, sqlite_busy_timeout=0.05) as ser:
        keys = [f"k{i}" for i in range(20)]
        await create_tables(ser.engine, *keys)
        # A busy timeout of 50 ms would fail at once if two of our writes ever met.
        handles = [ser.submit(increment, k, key=k, writer=f"w{j}") for k in keys for j in range(10)]
        await asyncio.gather(*handles)
        assert all(h.outcome is Outcome.COMMITTED for h in handles)
        assert [await counter(ser.engine, k) for k in keys] == [10] * 20


async def test_close_drains_or_withdraws(db_url: str) -> None:
    from writeturn import SerializerClosed, SerializerNotStarted

    ser = WriteSerializer.from_url(db_url)
    with pytest.raises(SerializerNotStarted, match="start"):
        ser.submit(record, "k", "w", 0, key="k")
    await ser.start()
    await create_tables(ser.engine)
    async with Blocker(ser):
        drained = [ser.submit(record, "k", "d", i, key="k") for i in range(3)]
        closing = asyncio.ensure_future(ser.close(drain=True))
        await asyncio.sleep(0.05)
        with pytest.raises(SerializerClosed):
            ser.submit(record, "k", "late", 9, key="k")
    await closing
    assert [h.outcome for h in drained] == [Outcome.COMMITTED] * 3
    await ser.close()  # idempotent

    ser = WriteSerializer.from_url(db_url)
    await ser.start()
    inside = asyncio.Event()

    async def hold(session: AsyncSession) -> None:
        await record(session, "k", "held", 10)
        inside.set()
        await asyncio.Event().wait()

    running = ser.submit(hold, key="k")
    queued = [ser.submit(record, "k", "q", 11 + i, key="k") for i in range(3)]
    await inside.wait()
    await ser.close(drain=False)
    assert running.outcome is Outcome.ROLLED_BACK
    assert [h.outcome for h in queued] == [Outcome.WITHDRAWN] * 3
    for h in (running, *queued):
        with pytest.raises(SerializerClosed):
            await h
    verify = WriteSerializer.from_url(db_url)
    async with verify:
        assert [r[3] for r in await ledger(verify.engine)] == [0, 1, 2]
        assert await pg_leftovers(verify.engine) == (0, 0)


async def test_stats_report_wait_and_hold_times(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)

        async def hold(session: AsyncSession) -> None:
            await record(session, "k", "w", 0)
            await asyncio.sleep(0.05)

        assert ser.stats().hold_p50 == 0.0
        await asyncio.gather(*(ser.run(hold, key="k") for _ in range(4)))
        stats = ser.stats()
        assert stats.hold_p50 >= 0.05  # each write held its turn through its sleep
        assert stats.wait_p99 >= 0.15  # the last one waited for the three before it
        assert stats.wait_p50 <= stats.wait_p99
