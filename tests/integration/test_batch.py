"""Group commit: the core guarantees hold for each write of a batch on its own."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome, TurnTimeout, WriteHandle, WriteSerializer

from ._db import (
    counter,
    create_tables,
    increment_concurrently,
    ledger,
    pg_leftovers,
    record,
    serializer,
    sqlite_threads_alive,
)
from .test_guarantees import Blocker
from .test_storm import check_storm, run_storm


class Commits:
    """Counts COMMITs sent on an engine (a batch sends one for all its writes)."""

    def __init__(self, engine: Any) -> None:
        self.count = 0
        event.listen(engine.sync_engine, "commit", self._on_commit)

    def _on_commit(self, conn: Any) -> None:
        self.count += 1


async def test_a_full_batch_shares_one_commit(db_url: str) -> None:
    async with serializer(db_url, batch_max=64) as ser:
        await create_tables(ser.engine)
        commits = Commits(ser.engine)
        async with Blocker(ser):
            handles = [ser.submit(record, "k", f"w{i % 4}", i, key="k") for i in range(64)]
        await asyncio.gather(*handles)
        assert all(h.outcome is Outcome.COMMITTED for h in handles)
        assert commits.count == 2  # the blocker's, then the batch's
        assert [r[3] for r in await ledger(ser.engine)] == list(range(64))


async def test_one_failing_write_leaves_the_other_63_committed(db_url: str) -> None:
    async with serializer(db_url, batch_max=64) as ser:
        await create_tables(ser.engine)
        commits = Commits(ser.engine)

        async def write(session: AsyncSession, i: int) -> None:
            await record(session, "k", "w", i)
            if i == 40:
                raise ValueError("write 40 fails")

        async with Blocker(ser):
            handles = [ser.submit(write, i, key="k", writer="w") for i in range(64)]
        results = await asyncio.gather(*handles, return_exceptions=True)
        assert isinstance(results[40], ValueError)
        outcomes = Counter(h.outcome for h in handles)
        assert outcomes == {Outcome.COMMITTED: 63, Outcome.ROLLED_BACK: 1}
        assert [r[3] for r in await ledger(ser.engine)] == [i for i in range(64) if i != 40]
        assert commits.count == 2
        assert await pg_leftovers(ser.engine) == (0, 0)


async def test_cancelled_writes_in_a_batch_leave_the_others_committed(db_url: str) -> None:
    async with serializer(db_url, batch_max=16) as ser:
        await create_tables(ser.engine)
        handles: list[WriteHandle[Any]] = []

        async def write(session: AsyncSession, i: int) -> None:
            await record(session, "k", "w", i)
            if i == 3:
                handles[3].cancel()  # cancelled while it runs
                await asyncio.sleep(0)
            if i == 9:
                handles[5].cancel()  # ran already, waits for the COMMIT: commits anyway
                handles[12].cancel()  # not run yet: left out

        async with Blocker(ser):
            handles.extend(ser.submit(write, i, key="k", writer="w") for i in range(16))
        results = await asyncio.gather(*handles, return_exceptions=True)
        expected = {3: Outcome.ROLLED_BACK, 12: Outcome.WITHDRAWN}
        for i, h in enumerate(handles):
            assert h.outcome is expected.get(i, Outcome.COMMITTED), i
            # Cancelled writes raise CancelledError, the one that committed too
            # (as a single write cancelled during its COMMIT does).
            assert isinstance(results[i], asyncio.CancelledError) is (i in (3, 5, 12)), i
        assert [r[3] for r in await ledger(ser.engine)] == [
            i for i in range(16) if i not in expected
        ]


async def test_a_noted_cancellation_applies_if_the_batch_is_rolled_back(db_url: str) -> None:
    # Write 2 is cancelled after its function ran, and write 4 times out then:
    # both are only noted. Write 6 then fails, which rolls the batch back: the
    # noted cancellation stops write 2 (it never runs again) and the noted
    # timeout stops write 4; the rest run again and commit.
    async with serializer(db_url, batch_max=8) as ser:
        await create_tables(ser.engine)
        handles: list[WriteHandle[Any]] = []
        runs: Counter[int] = Counter()

        async def write(session: AsyncSession, i: int) -> None:
            runs[i] += 1
            await record(session, "k", "w", i)
            if i == 5 and runs[i] == 1:
                handles[2].cancel()
                await asyncio.sleep(0.5)  # write 4's timeout (0.25 s) expires meanwhile
            if i == 6:
                raise ValueError("write 6 fails")

        async with Blocker(ser):
            handles.extend(
                ser.submit(write, i, key="k", writer="w", timeout=0.25 if i == 4 else None)
                for i in range(8)
            )
        results = await asyncio.gather(*handles, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        assert isinstance(results[4], TurnTimeout)
        assert isinstance(results[6], ValueError)
        expected = {2: Outcome.ROLLED_BACK, 4: Outcome.ROLLED_BACK, 6: Outcome.ROLLED_BACK}
        for i, h in enumerate(handles):
            assert h.outcome is expected.get(i, Outcome.COMMITTED), i
        assert runs == {0: 2, 1: 2, 2: 1, 3: 2, 4: 1, 5: 2, 6: 1, 7: 1}
        assert [r[3] for r in await ledger(ser.engine)] == [0, 1, 3, 5, 7]


async def test_a_timeout_after_its_function_ran_lets_the_write_commit(db_url: str) -> None:
    # Like a single write whose COMMIT is under way: the timeout cannot stop it.
    async with serializer(db_url, batch_max=4) as ser:
        await create_tables(ser.engine)

        async def write(session: AsyncSession, i: int) -> str:
            await record(session, "k", "w", i)
            if i == 3:
                await asyncio.sleep(0.5)  # write 0's timeout (0.25 s) expires meanwhile
            return f"done {i}"

        async with Blocker(ser):
            handles = [
                ser.submit(write, i, key="k", writer="w", timeout=0.25 if i == 0 else None)
                for i in range(4)
            ]
        assert await asyncio.gather(*handles) == ["done 0", "done 1", "done 2", "done 3"]
        assert all(h.outcome is Outcome.COMMITTED for h in handles)
        assert [r[3] for r in await ledger(ser.engine)] == [0, 1, 2, 3]


async def test_a_failed_shared_commit_fails_every_write_of_the_batch(db_url: str) -> None:
    async with serializer(db_url, batch_max=8) as ser:
        await create_tables(ser.engine)
        async with ser.engine.begin() as conn:
            await conn.exec_driver_sql(
                "CREATE TABLE node (id INTEGER PRIMARY KEY, parent INTEGER "
                "REFERENCES node(id) DEFERRABLE INITIALLY DEFERRED)"
            )

        async def write(session: AsyncSession, i: int) -> None:
            parent = 999 if i == 2 else None  # checked only at COMMIT
            await session.execute(
                text("INSERT INTO node VALUES (:i, :p)"), {"i": i + 1, "p": parent}
            )

        async with Blocker(ser):
            handles = [ser.submit(write, i, key="k") for i in range(8)]
        results = await asyncio.gather(*handles, return_exceptions=True)
        assert {h.outcome for h in handles} == {Outcome.ROLLED_BACK}
        assert all("FOREIGN KEY" in str(r).upper() for r in results)
        async with ser.engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM node"))).scalar() == 0


async def test_batches_keep_order_and_alternation(db_url: str) -> None:
    async with serializer(db_url, batch_max=4, batch_window=0.001) as ser:
        await create_tables(ser.engine)
        handles = []
        async with Blocker(ser):
            for writer, count in (("A", 5), ("B", 5), ("C", 3)):
                handles += [
                    ser.submit(record, "k", writer, i, key="k", writer=writer) for i in range(count)
                ]
        await asyncio.gather(*handles)
        assert "".join(r[2] for r in await ledger(ser.engine)) == "ABCABCABCABAB"


async def test_a_timed_out_write_in_a_batch_is_withdrawn(db_url: str) -> None:
    async with serializer(db_url, batch_max=8) as ser:
        await create_tables(ser.engine)

        async def slow(session: AsyncSession, i: int) -> None:
            await record(session, "k", "w", i)
            await asyncio.sleep(0.05)

        async with Blocker(ser):
            handles = [
                ser.submit(slow, i, key="k", timeout=0.12 if i == 6 else None) for i in range(8)
            ]
        results = await asyncio.gather(*handles, return_exceptions=True)
        assert isinstance(results[6], TurnTimeout)
        assert handles[6].outcome in (Outcome.WITHDRAWN, Outcome.ROLLED_BACK)
        assert [r[3] for r in await ledger(ser.engine)] == [0, 1, 2, 3, 4, 5, 7]


@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_batched_increments_lose_nothing(db_url: str, coordination: str) -> None:
    async with serializer(db_url, coordination=coordination, batch_max=8) as ser:
        await create_tables(ser.engine)
        await increment_concurrently(ser)
        assert await counter(ser.engine) == 500


@pytest.mark.slow
async def test_cancellation_storm_with_group_commit(db_url: str) -> None:
    async with serializer(db_url, coordination="advisory", batch_max=16) as ser:
        await create_tables(ser.engine)
        await check_storm(ser, await run_storm(ser))


async def test_close_returns_only_after_the_batch_returned_its_connection(db_url: str) -> None:
    # The writes of a batch are settled before the batch hands its connection
    # back; close() must wait for that too, or the engine is disposed with the
    # connection still out, and it stays open (on SQLite its thread outlives
    # the event loop).
    url = make_url(db_url)
    for attempt in range(5):
        ser = WriteSerializer.from_url(db_url, batch_max=8)
        await ser.start()
        if attempt == 0:
            await create_tables(ser.engine)
        before = sqlite_threads_alive()

        async def write(session: AsyncSession, i: int) -> None:
            await record(session, "k", "w", i)
            await asyncio.sleep(0.01)

        handles = [ser.submit(write, i, key="k", writer=f"w{i}") for i in range(8)]
        await asyncio.sleep(0.02)  # the batch is running
        await ser.close()  # drains: the batch commits, then hands its connection back
        assert all(h.outcome is Outcome.COMMITTED for h in handles)
        if url.get_backend_name() == "sqlite":
            assert not sqlite_threads_alive() - before, attempt
        else:
            conn = await asyncpg.connect(
                host=url.host, port=url.port, user=url.username, password=url.password
            )
            try:
                open_ = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", url.database
                )
            finally:
                await conn.close()
            assert open_ == 0, f"attempt {attempt}: {open_} connection(s) left open"
