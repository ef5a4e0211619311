"""One cell: one strategy, one workload, one number of writers, from fresh tables."""

from __future__ import annotations

import asyncio
import random
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from ...urls import describe_error, mask_password
from ._model import CellResult
from ._strategies import Database, Strategy, StrategyStats, make_strategy
from ._workloads import WORKLOAD_TABLE, Op, check_invariants, create_tables, drop_tables, make_ops

__all__ = ["CellSpec", "run_cell", "fairness_run", "percentile", "Record"]

#: A cancelled write is cancelled at a moment drawn uniformly from this many
#: seconds after its submission (it may be queued, running, committing or done).
CANCEL_WINDOW = 0.02


@dataclass(frozen=True)
class CellSpec:
    database: Database
    workload: str
    writers: int
    cancel_rate: float
    strategy: str
    writes: int
    burst: int
    seed: int


@dataclass(slots=True)
class Record:
    """What happened to one write, as the task that made it saw it."""

    op: Op
    submitted: float
    done: float = 0.0
    state: str = "pending"  # ok | cancelled | error
    error: str = ""

    def finish(self, task: asyncio.Task[None]) -> None:
        self.done = time.perf_counter()
        if task.cancelled():
            self.state = "cancelled"
        elif (exc := task.exception()) is not None:
            self.state, self.error = "error", describe_error(exc)
        else:
            self.state = "ok"

    @property
    def claimed(self) -> bool:
        """Whether the write is reported committed (writeturn: its outcome; others: returned)."""
        return self.op.claim if self.op.claim is not None else self.state == "ok"


async def run_cell(spec: CellSpec, admin: AsyncEngine) -> CellResult:
    """Run ``spec`` on fresh tables (created and dropped through ``admin``)."""
    result = CellResult(
        spec.database.label, spec.workload, spec.writers, spec.cancel_rate, spec.strategy
    )
    rng = random.Random(f"{spec.seed}:{spec.workload}:{spec.writers}")
    strategy = make_strategy(spec.strategy, spec.database, WORKLOAD_TABLE[spec.workload].apply, rng)
    why = strategy.unavailable()
    if why is not None:
        result.status, result.note = "unavailable", why
        return result
    per_writer = max(1, spec.writes // spec.writers)
    ops = make_ops(spec.workload, spec.writers, per_writer, rng)
    async with admin.begin() as conn:
        await create_tables(conn)
    try:
        records, stats, cpu = await _drive(strategy, spec, ops)
        async with admin.connect() as conn:
            inv = await check_invariants(conn, spec.workload)
            await conn.rollback()
    except Exception as exc:
        result.status = "failed"
        result.note = mask_password(f"{describe_error(exc)} (in {_where(exc)})", spec.database.url)
        return result
    finally:
        await _drop(admin, result)
    _fill(result, records, stats, inv.present, inv.lost_updates, spec.database)
    result.cpu_us_per_write = cpu * 1e6 / result.committed if result.committed else 0.0
    return result


async def _drop(admin: AsyncEngine, result: CellResult) -> None:
    """Drop the cell's tables; a failure is noted on the cell (the next cell drops them)."""
    try:
        async with admin.begin() as conn:
            await drop_tables(conn)
    except Exception as exc:
        result.note = (result.note + f"; dropping tables failed: {type(exc).__name__}").lstrip("; ")


async def _drive(
    strategy: Strategy, spec: CellSpec, ops: list[list[Op]]
) -> tuple[list[Record], StrategyStats, float]:
    """Run the cell's writes; return their records, the strategy's figures and the CPU
    seconds this process spent while the writes ran."""
    await strategy.open()
    try:
        cpu = time.process_time()
        if strategy.baseline:
            records = await _run_baseline(strategy, ops)
        else:
            cancels = _cancel_plan(spec, ops)
            # One writer goes one write at a time: the per-write overhead, against raw.
            burst = spec.burst if spec.writers > 1 else 1
            records = await _run_concurrent(strategy, ops, burst, cancels)
        cpu = time.process_time() - cpu
    finally:
        stats = await strategy.close()
    return records, stats, cpu


def _cancel_plan(spec: CellSpec, ops: list[list[Op]]) -> dict[int, float]:
    """Which writes to cancel (by id), and how long after their submission."""
    if spec.cancel_rate <= 0:
        return {}
    rng = random.Random(f"{spec.seed}:cancel:{spec.workload}:{spec.writers}:{spec.cancel_rate}")
    plan: dict[int, float] = {}
    for writer_ops in ops:
        for op in writer_ops:
            if rng.random() < spec.cancel_rate:
                plan[op.wid] = rng.uniform(0, CANCEL_WINDOW)
    return plan


async def _run_baseline(strategy: Strategy, ops: list[list[Op]]) -> list[Record]:
    """The writers' writes interleaved one by one, run by the baseline in that order."""
    order = [op for group in zip_longest(*ops) for op in group if op is not None]
    timings = await strategy.run_all(order)
    return [Record(op, t0, t1, "ok") for op, (t0, t1) in zip(order, timings, strict=True)]


async def _run_concurrent(
    strategy: Strategy, ops: list[list[Op]], burst: int, cancels: dict[int, float]
) -> list[Record]:
    """Each writer submits its writes ``burst`` at a time, each write in a task of its own."""
    loop = asyncio.get_running_loop()
    records: list[Record] = []
    timers: list[asyncio.TimerHandle] = []

    def spawn(op: Op) -> asyncio.Task[None]:
        rec = Record(op, time.perf_counter())
        records.append(rec)
        task = loop.create_task(strategy.write(op))
        task.add_done_callback(rec.finish)
        delay = cancels.get(op.wid)
        if delay is not None:
            timers.append(loop.call_later(delay, task.cancel))
        return task

    async def writer(writer_ops: list[Op]) -> None:
        for i in range(0, len(writer_ops), burst):
            await asyncio.wait([spawn(op) for op in writer_ops[i : i + burst]])

    try:
        await asyncio.gather(*(writer(w) for w in ops))
    finally:
        for timer in timers:
            timer.cancel()
    await asyncio.sleep(0)  # let the last done-callbacks run
    return records


def _fill(
    result: CellResult,
    records: list[Record],
    stats: StrategyStats,
    present: frozenset[int],
    lost: int,
    db: Database,
) -> None:
    committed = [r for r in records if r.claimed]
    claimed = {r.op.wid for r in committed}
    errors = [r for r in records if r.state == "error"]
    elapsed = max(r.done for r in records) - min(r.submitted for r in records)
    lat = sorted((r.done - r.submitted) * 1000 for r in committed)
    result.writes = len(records)
    result.committed = len(present)
    result.elapsed_s = elapsed
    result.writes_per_s = len(present) / elapsed if elapsed > 0 else 0.0
    result.p50_ms, result.p99_ms = percentile(lat, 0.50), percentile(lat, 0.99)
    result.max_ms = lat[-1] if lat else 0.0
    result.failed = len(errors)
    result.errors = stats.extra_errors + len(errors)
    result.cancelled = sum(r.state == "cancelled" for r in records)
    result.lost_updates = lost
    result.truth_violations = len(claimed - present) + len(present - claimed)
    result.connections_invalidated = stats.connections_invalidated
    result.connections_leaked = stats.connections_leaked
    result.fairness_run = fairness_run(records)
    if errors:
        result.note = mask_password(f"{len(errors)} failed, e.g. {errors[0].error}"[:200], db.url)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, round(q * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(len(sorted_values), rank) - 1]


def fairness_run(records: Sequence[Record]) -> int:
    """The longest run of consecutive commits on one key by one writer during which,
    at each commit, another writer had a write for that key submitted and not yet
    finished: how long others waited for that turn while one writer kept it.

    Per key, because a turn is per key: on the counter workload's four keys a
    writer that commits once on each key in a row has kept nobody from a turn
    they were waiting for. The same measure applies to the strategies with
    one lock for everything (lock, queue, semaphore): what a writer waiting on
    a key sees is how many writes of another writer that key took meanwhile."""
    by_key: dict[str, list[Record]] = {}
    for r in records:
        by_key.setdefault(r.op.key, []).append(r)
    return max((_longest_run(rs) for rs in by_key.values()), default=0)


def _longest_run(records: Sequence[Record]) -> int:
    events: list[tuple[float, int, int]] = []  # (time, 0 submit / 1 done, record index)
    for i, r in enumerate(records):
        events.append((r.submitted, 0, i))
        events.append((r.done, 1, i))
    events.sort()
    outstanding: Counter[int] = Counter()
    busy = best = run = 0
    last: int | None = None
    for _, kind, i in events:
        r = records[i]
        w = r.op.writer
        if kind == 0:
            busy += outstanding[w] == 0
            outstanding[w] += 1
            continue
        if r.claimed:
            others_waiting = busy - 1 > 0  # w itself is busy: this write is outstanding
            run = (run + 1 if last == w else 1) if others_waiting else 0
            best = max(best, run)
            last = w
        outstanding[w] -= 1
        busy -= outstanding[w] == 0
    return best


def _where(exc: BaseException) -> str:
    """The innermost writeturn frames an exception passed through, outermost first."""
    frames = [
        f"{Path(f.filename).stem}.{f.name}"
        for f in traceback.extract_tb(exc.__traceback__)
        if "writeturn" in f.filename
    ]
    return " > ".join(frames[-4:]) or "?"
