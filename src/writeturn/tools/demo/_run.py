"""The demo's run: the race, the timeout probes, the read-back, and the report built from them."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ...handle import WriteHandle
from ...outcome import Outcome
from ...serializer import WriteSerializer
from ...stats import SerializerStats
from ...urls import backend_of, normalize_url, redact
from ._checks import (
    Check,
    LedgerRow,
    PgLeftovers,
    ProbeRow,
    Reentry,
    TimedWrite,
    Turn,
    WriteResult,
    check_alternation,
    check_cancellation,
    check_counts,
    check_handover,
    check_mutual_exclusion,
    check_order,
    check_outcome_truth,
    check_reentrancy,
    check_stats,
    check_timeouts,
)
from ._plan import (
    ABANDON_SECONDS,
    APPLICATION_NAME,
    DEADLINE_KEY,
    ELSEWHERE_KEY,
    HOT_KEY,
    NAMESPACE,
    PROGRESS_INTERVAL,
    QUEUED_TIMEOUT,
    RUNNING_TIMEOUT,
    TIMED_QUEUED,
    TIMED_RUNNING,
    CancelMode,
    DemoOptions,
    PlannedWrite,
    key_names,
    plan_writes,
    writer_names,
)
from ._report import DemoReport, letters_for

_metadata = MetaData()
ledger = Table(
    "writeturn_demo_ledger",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(100), nullable=False),
    Column("writer", String(100), nullable=False),
    Column("writer_seq", Integer, nullable=False),
    Column("balance_after", Integer, nullable=False),
    sqlite_autoincrement=True,
)
counter = Table(
    "writeturn_demo_counter",
    _metadata,
    Column("key", String(100), primary_key=True),
    Column("value", Integer, nullable=False),
)
# What the re-entrant attempts and the timeout probes would leave, had they run to the end.
probe = Table(
    "writeturn_demo_probe",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(20), nullable=False),
    Column("name", String(100), nullable=False),
    sqlite_autoincrement=True,
)

#: Progress callback: (writes settled, writes in all).
Progress = Callable[[int, int], None]


# -- running it --------------------------------------------------------------------


@dataclass(eq=False)
class _Live:
    """One write while the demo runs."""

    plan: PlannedWrite
    handle: WriteHandle[None] | None = None
    awaiter: asyncio.Task[None] | None = None
    scope: asyncio.Timeout | None = None
    cancelled_while_queued: bool = False
    cancel_sent: bool = False

    def result(self) -> WriteResult:
        assert self.handle is not None
        p = self.plan
        return WriteResult(
            p.writer,
            p.seq,
            p.key,
            self.handle.outcome,
            self.cancelled_while_queued,
            planned=p.mode,
            cancel_sent=self.cancel_sent,
            raised=_raised(self.awaiter),
        )


def _raised(task: asyncio.Task[Any] | None) -> str:
    """What ``task`` ended with: an exception's type name, or ``""`` if it returned."""
    if task is None or not task.done():
        return "(unsettled)"
    if task.cancelled():
        return "CancelledError"
    error = task.exception()
    return "" if error is None else type(error).__name__


@dataclass
class _Recorder:
    """What the write functions note as they run: turns, writes in flight, due cancels,
    re-entrant attempts."""

    ser: WriteSerializer
    sqlite: bool
    turns: list[Turn] = field(default_factory=list)
    turn_count: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    due: dict[tuple[str, int], list[_Live]] = field(default_factory=dict)
    reentries: list[Reentry] = field(default_factory=list)

    def turn_started(self, live: _Live) -> None:
        key = live.plan.key
        number = self.turn_count[key]
        self.turn_count[key] += 1
        # Cancel the writes due now first, so the snapshot shows who still waits.
        for target in self.due.pop((key, number), []):
            _cancel_if_queued(target)
        waiting = tuple(str(w) for w in self.ser.key_statistics(key).writers)
        self.turns.append(Turn(key, live.plan.writer, waiting, live.plan.seq))
        self.in_flight[key] += 1
        self.max_in_flight[key] = max(self.max_in_flight[key], self.in_flight[key])

    def turn_ended(self, live: _Live) -> None:
        self.in_flight[live.plan.key] -= 1

    def try_reentry(self, live: _Live) -> None:
        """From inside ``live``'s turn, start a write that would wait for that turn."""
        p = live.plan
        # On SQLite every key is re-entrant (one writer): try another key every other time.
        inner = ELSEWHERE_KEY if self.sqlite and len(self.reentries) % 2 else p.key
        raised = ""
        try:
            inner_handle = self.ser.submit(
                _probe_write, "reentrant", f"{p.writer} #{p.seq}", key=inner, writer=p.writer
            )
        except Exception as exc:  # the check names whatever was raised
            raised = type(exc).__name__
        else:
            inner_handle.cancel()  # it waits for this very turn: withdraw it, or it never ends
        self.reentries.append(Reentry(p.writer, p.seq, p.key, inner, raised))


def _cancel_if_queued(live: _Live) -> None:
    if live.handle is not None and live.handle.queued:
        live.cancelled_while_queued = live.cancel_sent = True
        live.handle.cancel()


def _cancel_at(live: _Live, step: int) -> None:
    """Send ``live``'s mid-write cancellation if this is its step: cancel the awaiting task,
    or make the ``asyncio.timeout`` around the await expire now."""
    p = live.plan
    if p.at_step != step:
        return
    if p.mode is CancelMode.TASK and live.awaiter is not None:
        live.cancel_sent = True
        live.awaiter.cancel()
    elif p.mode is CancelMode.TIMEOUT and live.scope is not None:
        live.cancel_sent = True
        live.scope.reschedule(asyncio.get_running_loop().time())


async def _write(session: AsyncSession, rec: _Recorder, live: _Live) -> None:
    """Read the counter, pause, write value + 1 and a ledger row: racy without exclusion."""
    p = live.plan
    rec.turn_started(live)
    try:
        _cancel_at(live, 0)
        found = await session.execute(select(counter.c.value).where(counter.c.key == p.key))
        value: int = found.scalar_one()
        _cancel_at(live, 1)
        if p.reenter:
            rec.try_reentry(live)
        await asyncio.sleep(p.pause)
        await session.execute(update(counter).where(counter.c.key == p.key).values(value=value + 1))
        _cancel_at(live, 2)
        await session.execute(
            insert(ledger).values(
                key=p.key, writer=p.writer, writer_seq=p.seq, balance_after=value + 1
            )
        )
    finally:
        rec.turn_ended(live)


async def _probe_write(session: AsyncSession, kind: str, name: str) -> None:
    await session.execute(insert(probe).values(kind=kind, name=name))


async def _await_write(live: _Live) -> None:
    assert live.handle is not None
    async with asyncio.timeout(None) as scope:  # armed by the write itself (TIMEOUT mode)
        live.scope = scope
        await live.handle


def _submit_all(ser: WriteSerializer, rec: _Recorder, plan: Sequence[PlannedWrite]) -> list[_Live]:
    """Queue every write at once, then start one task awaiting each handle."""
    lives = [_Live(p) for p in plan]
    for live in lives:
        p = live.plan
        live.handle = ser.submit(_write, rec, live, key=p.key, writer=p.writer)
        if p.mode is CancelMode.QUEUED:
            rec.due.setdefault((p.key, p.trigger_turn), []).append(live)
    for live in lives:
        live.awaiter = asyncio.create_task(_await_write(live))
    return lives


async def _settle(
    awaiters: Sequence[asyncio.Task[None]], time_limit: float, progress: Progress | None
) -> set[asyncio.Task[None]]:
    """Wait until every awaiter is done or ``time_limit`` passed; return those still pending."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + time_limit
    pending = set(awaiters)
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(left, PROGRESS_INTERVAL))
        if progress is not None:
            progress(len(awaiters) - len(pending), len(awaiters))
    return pending


# -- the timeout probes ------------------------------------------------------------


async def _hold(session: AsyncSession, started: asyncio.Event, release: asyncio.Event) -> None:
    await session.execute(insert(probe).values(kind="timeout", name="holder"))
    started.set()
    await release.wait()


async def _stall(session: AsyncSession, name: str, started: list[str]) -> None:
    started.append(name)
    await session.execute(insert(probe).values(kind="timeout", name=name))
    await asyncio.Event().wait()  # never set: the write's timeout ends it


def _ended(error: BaseException | None) -> str:
    return "" if error is None else type(error).__name__


async def _timeout_probes(ser: WriteSerializer) -> list[TimedWrite]:
    """Writes with ``timeout=``: some expire behind a held turn, some inside their function."""
    started: list[str] = []
    timed: list[TimedWrite] = []
    held, release = asyncio.Event(), asyncio.Event()
    holder = ser.submit(_hold, held, release, key=DEADLINE_KEY, writer="holder")
    try:
        await held.wait()
        queued = [
            (
                f"queued-{i}",
                ser.submit(
                    _stall,
                    f"queued-{i}",
                    started,
                    key=DEADLINE_KEY,
                    writer=f"queued-{i}",
                    timeout=QUEUED_TIMEOUT,
                ),
            )
            for i in range(1, TIMED_QUEUED + 1)
        ]
        ends = await asyncio.gather(*(h for _, h in queued), return_exceptions=True)
        for (name, h), end in zip(queued, ends, strict=True):
            ended = end if isinstance(end, BaseException) else None
            timed.append(
                TimedWrite(
                    name, "queued", QUEUED_TIMEOUT, name in started, _ended(ended), h.outcome
                )
            )
    finally:
        release.set()
    await holder
    for i in range(1, TIMED_RUNNING + 1):
        name = f"running-{i}"
        h = ser.submit(
            _stall, name, started, key=DEADLINE_KEY, writer=name, timeout=RUNNING_TIMEOUT
        )
        error: BaseException | None = None
        try:
            await h
        except Exception as exc:  # the check names whatever was raised
            error = exc
        timed.append(
            TimedWrite(name, "running", RUNNING_TIMEOUT, name in started, _ended(error), h.outcome)
        )
    await ser.run(_probe_write, "timeout", "after", key=DEADLINE_KEY, writer="after")
    return timed


# -- the database ------------------------------------------------------------------


async def _prepare(engine: AsyncEngine, keys: Iterable[str]) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_metadata.create_all)
        for table in (ledger, counter, probe):  # left by an earlier run with --keep
            await conn.execute(delete(table))
        await conn.execute(insert(counter), [{"key": k, "value": 0} for k in keys])


async def _drop(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_metadata.drop_all)


@dataclass(frozen=True)
class _Database:
    """What the database holds after the run."""

    rows: list[LedgerRow]
    counters: dict[str, int]
    probes: list[ProbeRow]
    leftovers: PgLeftovers | None


async def _read_back(engine: AsyncEngine, postgres: bool) -> _Database:
    async with engine.connect() as conn:
        found = await conn.execute(select(ledger).order_by(ledger.c.id))
        rows = [LedgerRow(*r) for r in found]
        values = await conn.execute(select(counter.c.key, counter.c.value))
        counters = {k: v for k, v in values}
        probed = await conn.execute(select(probe.c.kind, probe.c.name).order_by(probe.c.id))
        probes = [ProbeRow(kind, name) for kind, name in probed]
        await conn.rollback()
    leftovers = await _pg_leftovers(engine) if postgres else None
    return _Database(rows, counters, probes, leftovers)


_PG_LEFTOVERS = text(
    """
    SELECT
      (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND a.datname = current_database()
          AND a.application_name = :app),
      (SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND application_name = :app
          AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid())
    """
)


async def _pg_leftovers(engine: AsyncEngine) -> PgLeftovers:
    async with engine.connect() as conn:
        locks, idle = (await conn.execute(_PG_LEFTOVERS, {"app": APPLICATION_NAME})).one()
        await conn.rollback()
    return PgLeftovers(advisory_locks=int(locks), idle_in_transaction=int(idle))


def _unexpected(awaiters: Iterable[asyncio.Task[None]]) -> tuple[str, ...]:
    """Errors other than the CancelledError / TimeoutError the demo caused itself."""
    found = (None if t.cancelled() else t.exception() for t in awaiters if t.done())
    return tuple(
        f"{type(e).__name__}: {e}"
        for e in found
        if e is not None and not isinstance(e, asyncio.CancelledError | TimeoutError)
    )


# -- the whole run ------------------------------------------------------------------


async def run_demo(options: DemoOptions, *, progress: Progress | None = None) -> DemoReport:
    """Run the demo on ``options.url`` (or a temporary SQLite file) and check every guarantee.

    ``progress``, if given, is called about twice a second while the race runs with
    (writes settled, writes in all).
    """
    if options.url is not None:
        return await _run(options, normalize_url(options.url), progress, temporary=False)
    folder = tempfile.mkdtemp(prefix="writeturn-demo-")
    try:
        url = URL.create("sqlite+aiosqlite", database=str(Path(folder) / "demo.db"))
        return await _run(options, url, progress, temporary=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _run(
    options: DemoOptions, url: URL, progress: Progress | None, *, temporary: bool
) -> DemoReport:
    postgres = backend_of(url) == "postgresql"
    engine_options: dict[str, Any] = {}
    if postgres:  # lets the leftover checks tell the demo's sessions from any others
        engine_options["connect_args"] = {"server_settings": {"application_name": APPLICATION_NAME}}
    ser = WriteSerializer.from_url(
        url, coordination=options.coordination, namespace=NAMESPACE, **engine_options
    )
    started = time.perf_counter()
    database: _Database | None = None
    timed: list[TimedWrite] = []
    stalled: set[asyncio.Task[None]] = set()
    abandoned = False  # stopped half-way: its writes may still hold the tables
    async with ser:
        try:
            await _prepare(ser.engine, key_names(options.keys))
            rec = _Recorder(ser, sqlite=not postgres)
            lives = _submit_all(ser, rec, plan_writes(options))
            awaiters = [live.awaiter for live in lives if live.awaiter is not None]
            stalled = await _settle(awaiters, options.time_limit, progress)
            unexpected = _unexpected(awaiters)
            stats = ser.stats()  # of the race alone, before the timeout probes
            if stalled:
                abandoned = True
                await _abandon(ser)
            else:
                try:
                    async with asyncio.timeout(options.time_limit):
                        timed = await _timeout_probes(ser)
                except TimeoutError:  # a write with timeout= that never ended: no verdict
                    unexpected += (
                        f"the writes with timeout= had not ended after {options.time_limit:g} s",
                    )
                    abandoned = True
                    await _abandon(ser)
                else:
                    database = await _read_back(ser.engine, postgres)
        finally:
            if not options.keep and not abandoned:
                with contextlib.suppress(SQLAlchemyError, OSError):
                    await _drop(ser.engine)
    return _report(
        options,
        redact(url),
        temporary,
        lives,
        rec,
        stats,
        database,
        timed,
        elapsed=time.perf_counter() - started,
        stalled=len(stalled),
        unexpected=unexpected,
        kept=options.keep or abandoned,
    )


async def _abandon(ser: WriteSerializer) -> None:
    """Stop what a stalled run left behind, as far as it lets itself be stopped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ser.close(drain=False), ABANDON_SECONDS)


def _report(
    options: DemoOptions,
    database_url: str,
    temporary: bool,
    lives: Sequence[_Live],
    rec: _Recorder,
    stats: SerializerStats,
    database: _Database | None,
    timed: Sequence[TimedWrite],
    *,
    elapsed: float,
    stalled: int,
    unexpected: tuple[str, ...],
    kept: bool,
) -> DemoReport:
    results = [live.result() for live in lives]
    sent = Counter(live.plan.mode for live in lives if live.cancel_sent)
    checks: tuple[Check, ...] = ()
    if database is not None:
        rows = database.rows
        checks = (
            check_mutual_exclusion(database.counters, rows, results),
            check_order(rows),
            check_alternation(rec.turns),
            check_handover(rec.max_in_flight, database.leftovers),
            check_cancellation(results, rows),
            check_outcome_truth(results, rows),
            check_reentrancy(rec.reentries, database.probes, results),
            check_timeouts(timed, database.probes),
            check_counts(results, len(lives)),
            check_stats(stats, results, sum(sent.values())),
        )
    writers = tuple(writer_names(options.writers))
    return DemoReport(
        database=database_url,
        temporary=temporary,
        coordination=options.coordination,
        writers=writers,
        writes=options.writes,
        cancel_rate=options.cancel_rate,
        seed=options.seed,
        keys=tuple(key_names(options.keys)),
        commit_order=_commit_order(database.rows if database else [], writers),
        turn_order=_turn_order(rec.turns, results, writers),
        outcomes=_outcomes_by_writer(results),
        cancels=dict(sent),
        checks=checks,
        stats=stats,
        elapsed=elapsed,
        unexpected=unexpected,
        stalled=stalled,
        results=tuple(results),
        kept=kept and not temporary,
    )


def _commit_order(rows: Sequence[LedgerRow], writers: Iterable[str]) -> str:
    letters = letters_for(writers)
    return "".join(letters.get(r.writer, "?") for r in rows if r.key == HOT_KEY)


def _turn_order(
    turns: Sequence[Turn], results: Sequence[WriteResult], writers: Iterable[str]
) -> str:
    letters = letters_for(writers)
    committed = {(r.writer, r.seq) for r in results if r.outcome is Outcome.COMMITTED}
    return "".join(
        letters.get(t.writer, "?")
        if (t.writer, t.seq) in committed
        else letters.get(t.writer, "?").lower()
        for t in turns
        if t.key == HOT_KEY
    )


def _outcomes_by_writer(results: Iterable[WriteResult]) -> dict[str, dict[Outcome, int]]:
    table: dict[str, dict[Outcome, int]] = {}
    for r in results:
        row = table.setdefault(r.writer, {})
        row[r.outcome] = row.get(r.outcome, 0) + 1
    return table
