"""The write journal: idempotency keys apply a write once; per-key seqs are gap-free."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import JournalMissing, Outcome, WriteSerializer, migrations

from ._db import counter, create_tables, serializer

WORKER = Path(__file__).with_name("_journal_worker.py")


async def apply(session: AsyncSession) -> str:
    await session.execute(text("UPDATE counter SET n = n + 1 WHERE key = 'k'"))
    return "applied"


async def migrated(url: str) -> None:
    await migrations.upgrade_async(url)
    async with serializer(url) as ser:
        await create_tables(ser.engine)


async def journal_rows(ser: WriteSerializer) -> list[tuple[Any, ...]]:
    async with ser.engine.connect() as conn:
        sql = "SELECT key, seq, idempotency_key FROM writeturn_journal ORDER BY key, seq"
        return [tuple(r) for r in await conn.execute(text(sql))]


async def test_same_idempotency_key_applies_once(db_url: str) -> None:
    await migrated(db_url)
    async with serializer(db_url) as ser:
        handles = [ser.submit(apply, key="k", idempotency_key="req-123") for _ in range(20)]
        results = await asyncio.gather(*handles)
        assert all(h.outcome is Outcome.COMMITTED for h in handles)
        assert sum(not h.duplicate for h in handles) == 1
        assert results.count("applied") == 1 and results.count(None) == 19
        assert {h.seq for h in handles} == {1}
        assert await counter(ser.engine) == 1
        assert await ser.outcome_of("req-123") is Outcome.COMMITTED
        assert await ser.outcome_of("req-never") is None


async def test_a_rolled_back_write_leaves_no_journal_row_and_no_gap(db_url: str) -> None:
    await migrated(db_url)
    async with serializer(db_url, journal=True) as ser:

        async def fails(session: AsyncSession) -> None:
            await apply(session)
            raise RuntimeError("undo")

        first = await ser.submit(apply, key="k")
        bad = ser.submit(fails, key="k", idempotency_key="req-bad")
        with pytest.raises(RuntimeError):
            await bad
        second = ser.submit(apply, key="k")
        await second
        assert first == "applied" and bad.seq is None and second.seq == 2
        retry = await ser.run(apply, key="k", idempotency_key="req-bad")
        assert retry == "applied"  # the failed attempt was never recorded
        assert [r[:2] for r in await journal_rows(ser)] == [("k", 1), ("k", 2), ("k", 3)]


async def test_cancelled_during_commit_then_retried_applies_once(db_url: str) -> None:
    await migrated(db_url)
    async with serializer(db_url) as ser:
        box: dict[str, Any] = {}

        def cancel_now(conn: Any) -> None:
            box["task"].cancel()

        async def attempt() -> None:
            box["handle"] = ser.submit(apply, key="k", idempotency_key="req-7")
            await box["handle"]

        event.listen(ser.engine.sync_engine, "commit", cancel_now, once=True)
        box["task"] = asyncio.ensure_future(attempt())
        with pytest.raises(asyncio.CancelledError):
            await box["task"]
        # The caller saw only a cancellation; retrying with the key is safe.
        retry = ser.submit(apply, key="k", idempotency_key="req-7")
        await retry
        assert box["handle"].outcome is Outcome.COMMITTED
        assert retry.duplicate and retry.outcome is Outcome.COMMITTED
        assert await counter(ser.engine) == 1


async def test_sequence_numbers_follow_commit_order(db_url: str) -> None:
    await migrated(db_url)
    async with serializer(db_url, journal=True) as ser:
        handles = [ser.submit(apply, key=k, writer=f"w{i % 3}") for i in range(30) for k in "ab"]
        ctx = ser.transaction(key="a")
        async with ctx as session:
            await apply(session)
        await asyncio.gather(*handles)
        assert ctx.handle.seq is not None
        for k in "ab":
            seqs = [h.seq for h in handles if h.key == k] + ([ctx.handle.seq] if k == "a" else [])
            assert sorted(seqs) == list(range(1, len(seqs) + 1))  # type: ignore[type-var]
            for w in ("w0", "w1", "w2"):  # a writer's writes were numbered in submission order
                mine = [h.seq for h in handles if h.key == k and h.writer == w]
                assert mine == sorted(mine)  # type: ignore[type-var]
        assert [r[1] for r in await journal_rows(ser) if r[0] == "a"] == list(range(1, 32))


async def test_missing_journal_table_says_to_migrate(db_url: str) -> None:
    ser = WriteSerializer.from_url(db_url, journal=True)
    with pytest.raises(JournalMissing, match="writeturn migrate upgrade"):
        await ser.start()
    await ser.close()
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        handle = ser.submit(apply, key="k", idempotency_key="req-1")
        with pytest.raises(JournalMissing, match="writeturn migrate upgrade"):
            await handle
        assert handle.outcome is Outcome.ROLLED_BACK
        with pytest.raises(JournalMissing):
            await ser.outcome_of("req-1")
        assert await counter(ser.engine) == 0


async def run_workers(url: str, mode: str, count: int, tmp_path: Path) -> list[dict[str, Any]]:
    barrier = tmp_path / f"go-{mode}"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            url,
            mode,
            str(count),
            str(barrier),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    barrier.touch()
    results = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


@pytest.mark.slow
async def test_idempotency_across_four_processes(db_url: str, tmp_path: Path) -> None:
    await migrated(db_url)
    results = await run_workers(db_url, "idem", 5, tmp_path)
    assert sum(r["committed"] for r in results) == 20
    assert sum(r["duplicates"] for r in results) == 19
    async with serializer(db_url) as ser:
        assert await counter(ser.engine) == 1


@pytest.mark.slow
async def test_sequence_numbers_are_gap_free_across_four_processes(
    db_url: str, tmp_path: Path
) -> None:
    await migrated(db_url)
    results = await run_workers(db_url, "seq", 200, tmp_path)
    seqs = sorted(s for r in results for s in r["seqs"])
    assert seqs == list(range(1, 801))
    for r in results:  # each process saw its own writes in increasing order
        assert r["seqs"] == sorted(r["seqs"])
    async with serializer(db_url) as ser:
        assert await counter(ser.engine) == 800
        assert [r[1] for r in await journal_rows(ser)] == list(range(1, 801))
