"""``writeturn demo``: many writers race on one hot key; every guarantee is checked in the database.

Each writer queues all its writes at once; every write is a read-then-write
(read a counter, pause, store value + 1 and append a ledger row), the pattern
that loses updates without mutual exclusion. A seeded share of the writes is
cancelled at random moments: while queued (``handle.cancel()``), or while
running (the task awaiting the handle is cancelled, or an ``asyncio.timeout``
around the await expires). Afterwards the ledger and the counters are read
back and each guarantee of :class:`~writeturn.WriteSerializer` is checked
against them.

The demo's tables (``writeturn_demo_ledger`` and ``writeturn_demo_counter``)
are its own: it creates them if missing and empties them at start; the
library's migrations never touch them.

:func:`run_demo` runs the demo and returns a :class:`DemoReport`;
:func:`format_report` renders it; the ``check_*`` functions are pure, so they
can be tried on any data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import math
import random
import shutil
import string
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
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

from .dialects import Coordination
from .errors import ConfigurationError, WriteturnError
from .handle import WriteHandle
from .outcome import Outcome
from .serializer import WriteSerializer
from .stats import SerializerStats
from .urls import backend_of, normalize_url, redact

__all__ = [
    "DemoOptions",
    "DemoReport",
    "Check",
    "LedgerRow",
    "Turn",
    "WriteResult",
    "PgLeftovers",
    "run_demo",
    "format_report",
    "check_mutual_exclusion",
    "check_order",
    "check_alternation",
    "check_handover",
    "check_cancellation",
    "check_outcome_truth",
    "check_stats",
    "longest_run",
    "register_cli",
]

HOT_KEY = "hot"
NAMESPACE = "writeturn-demo"
APPLICATION_NAME = "writeturn-demo"
MAX_WRITERS = len(string.ascii_uppercase)  # one letter each in the commit strip
MAX_WRITES = 100_000
MAX_KEYS = 10
STRIP_LENGTH = 60
DEFAULT_TIME_LIMIT = 60.0
#: Seconds a stalled run is given to stop once abandoned.
ABANDON_SECONDS = 5.0
#: Share of the writes that go to the other keys (when there are any).
OTHER_KEY_SHARE = 0.25

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


# -- options -------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs. ``url=None``: a temporary SQLite file, removed afterwards."""

    url: str | None = None
    writers: int = 4
    writes: int = 50
    cancel_rate: float = 0.3
    coordination: Coordination = "advisory"
    seed: int = 7
    keys: int = 1
    time_limit: float = DEFAULT_TIME_LIMIT  # seconds the writes get to settle

    def __post_init__(self) -> None:
        problems = [
            _int_problem("writers", self.writers, 1, MAX_WRITERS),
            _int_problem("writes", self.writes, 1, MAX_WRITES),
            _int_problem("keys", self.keys, 0, MAX_KEYS),
            _rate_problem(self.cancel_rate),
            _seconds_problem(self.time_limit),
        ]
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            problems.append(f"seed must be a whole number, got {self.seed!r}")
        if self.coordination not in ("turn", "advisory"):
            problems.append(f"coordination must be 'turn' or 'advisory', got {self.coordination!r}")
        if self.url is not None:
            normalize_url(self.url)  # raises UnsupportedDatabase, password masked
        found = [p for p in problems if p]
        if found:
            raise ConfigurationError("; ".join(found))


def _int_problem(name: str, value: object, lo: int, hi: int) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        return None
    return f"{name} must be a whole number from {lo} to {hi}, got {value!r}"


def _seconds_problem(value: object) -> str | None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
    return None if ok else f"time limit must be a number of seconds above 0, got {value!r}"


def _rate_problem(value: object) -> str | None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= 1
    )
    return None if ok else f"cancel rate must be a number from 0 to 1, got {value!r}"


# -- the plan: who writes what, and which writes are cancelled how ---------------


class CancelMode(enum.Enum):
    """How (and whether) the demo cancels one write."""

    NONE = "none"
    QUEUED = "queued"  # handle.cancel() while the write waits in line
    TASK = "task"  # the task awaiting the handle is cancelled in mid-write
    TIMEOUT = "timeout"  # an asyncio.timeout around the await expires in mid-write


@dataclass(frozen=True)
class PlannedWrite:
    """One write, decided before anything runs (from the seed alone)."""

    writer: str
    seq: int  # submission index within the writer
    key: str
    mode: CancelMode
    pause: float  # seconds between the read and the write
    at_step: int  # TASK: 0 before the read, 1 after it, 2 between update and insert
    deadline: float  # TIMEOUT: seconds after the write's turn starts
    trigger_turn: int  # QUEUED: cancelled at the start of this turn on its key


def writer_names(count: int) -> list[str]:
    return [f"writer-{i}" for i in range(1, count + 1)]


def key_names(extra: int) -> list[str]:
    return [HOT_KEY, *(f"other-{i}" for i in range(1, extra + 1))]


def plan_writes(options: DemoOptions) -> list[PlannedWrite]:
    """Every write of every writer, in submission order (writer by writer)."""
    rng = random.Random(options.seed)
    others = key_names(options.keys)[1:]
    plan: list[PlannedWrite] = []
    for writer in writer_names(options.writers):
        per_key: Counter[str] = Counter()
        for seq in range(options.writes):
            key = rng.choice(others) if others and rng.random() < OTHER_KEY_SHARE else HOT_KEY
            plan.append(_plan_one(rng, options, writer, seq, key, per_key[key]))
            per_key[key] += 1
    return plan


def _plan_one(
    rng: random.Random, options: DemoOptions, writer: str, seq: int, key: str, index: int
) -> PlannedWrite:
    mode = CancelMode.NONE
    if rng.random() < options.cancel_rate:
        mode = rng.choice((CancelMode.QUEUED, CancelMode.TASK, CancelMode.TIMEOUT))
    # Turns rotate among the writers, so this write's turn on its key comes
    # around turn index * writers, fewer as cancelled writes drop out.
    expected_turn = int(index * options.writers * (1 - options.cancel_rate))
    return PlannedWrite(
        writer=writer,
        seq=seq,
        key=key,
        mode=mode,
        pause=0.0 if rng.random() < 0.5 else rng.uniform(0, 0.001),
        at_step=rng.randrange(3),
        deadline=rng.uniform(0, 0.003),
        trigger_turn=rng.randrange(max(1, expected_turn)),
    )


# -- what the checks look at ---------------------------------------------------


@dataclass(frozen=True)
class LedgerRow:
    id: int
    key: str
    writer: str
    writer_seq: int
    balance_after: int


@dataclass(frozen=True)
class Turn:
    """A write's turn as its write function saw it start: the key, its writer,
    and the writers then waiting for the key, in turn order."""

    key: str
    writer: str
    waiting: tuple[str, ...]
    seq: int = 0


@dataclass(frozen=True)
class WriteResult:
    """How one write ended, as its handle reports it."""

    writer: str
    seq: int
    key: str
    outcome: Outcome
    cancelled_while_queued: bool = False


@dataclass(frozen=True)
class PgLeftovers:
    """What a Postgres database still holds for the demo's sessions after the run."""

    advisory_locks: int
    idle_in_transaction: int


@dataclass(frozen=True)
class Check:
    number: int
    name: str
    passed: bool
    detail: str


# -- the checks (pure functions) -----------------------------------------------


def check_mutual_exclusion(
    counters: Mapping[str, int], rows: Sequence[LedgerRow], results: Sequence[WriteResult]
) -> Check:
    """Per key: counter == COMMITTED writes == ledger rows, and balances run 1..N in id order."""
    problems: list[str] = []
    summary: list[str] = []
    committed = Counter(r.key for r in results if r.outcome is Outcome.COMMITTED)
    for key in sorted(set(counters) | set(committed) | {r.key for r in rows}):
        balances = [r.balance_after for r in sorted(rows, key=lambda r: r.id) if r.key == key]
        value, done = counters.get(key, 0), committed[key]
        if not value == done == len(balances):
            problems.append(
                f"{key}: counter {value}, {done} committed, {len(balances)} ledger rows"
            )
        elif balances != list(range(1, len(balances) + 1)):
            step = next(i for i, b in enumerate(balances) if b != i + 1)
            problems.append(f"{key}: balance {balances[step]} where {step + 1} was due")
        else:
            summary.append(f"{key} {value}")
    if problems:
        return Check(1, "mutual exclusion", False, "lost or extra update: " + "; ".join(problems))
    return Check(
        1,
        "mutual exclusion",
        True,
        "counter = committed writes = ledger rows, balances 1..N (" + ", ".join(summary) + ")",
    )


def check_order(rows: Sequence[LedgerRow]) -> Check:
    """Per (key, writer): writer_seq strictly increases in commit (id) order."""
    last: dict[tuple[str, str], int] = {}
    for row in sorted(rows, key=lambda r: r.id):
        lane = (row.key, row.writer)
        before = last.get(lane)
        if before is not None and row.writer_seq <= before:
            return Check(
                2,
                "order",
                False,
                f"{row.writer} committed write #{row.writer_seq} on {row.key} after #{before}",
            )
        last[lane] = row.writer_seq
    return Check(
        2, "order", True, "each writer's writes committed in submission order on every key"
    )


def longest_run(turns: Sequence[Turn], key: str) -> tuple[str | None, int]:
    """The writer with the most consecutive turns on ``key``, and how many."""
    best: tuple[str | None, int] = (None, 0)
    writer, run = None, 0
    for turn in turns:
        if turn.key != key:
            continue
        run = run + 1 if turn.writer == writer else 1
        writer = turn.writer
        if run > best[1]:
            best = (writer, run)
    return best


def check_alternation(turns: Sequence[Turn]) -> Check:
    """No writer takes two turns in a row on a key while another writer waited
    at the start of the first of them."""
    previous: dict[str, tuple[int, Turn]] = {}
    unfair: list[str] = []
    counts: Counter[str] = Counter()
    for turn in turns:
        number = counts[turn.key]
        counts[turn.key] += 1
        before = previous.get(turn.key)
        previous[turn.key] = (number, turn)
        if before is None or before[1].writer != turn.writer:
            continue
        passed_over = [w for w in before[1].waiting if w != turn.writer]
        if passed_over:
            unfair.append(
                f"{turn.writer} took turns {before[0] + 1} and {number + 1} on {turn.key} "
                f"while {', '.join(passed_over)} waited"
            )
    writer, run = longest_run(turns, HOT_KEY)
    run_text = f"longest run by one writer on {HOT_KEY}: {run}" + (f" ({writer})" if writer else "")
    if unfair:
        more = f" (+{len(unfair) - 1} more)" if len(unfair) > 1 else ""
        return Check(3, "alternation", False, f"{unfair[0]}{more}; {run_text}")
    return Check(3, "alternation", True, f"turns rotate among waiting writers; {run_text}")


def check_handover(max_in_flight: Mapping[str, int], leftovers: PgLeftovers | None) -> Check:
    """At most one write in flight per key; on Postgres, no lock or open transaction left."""
    problems = [f"{n} writes in flight at once on {k}" for k, n in max_in_flight.items() if n > 1]
    if leftovers is not None:
        if leftovers.advisory_locks:
            problems.append(f"{leftovers.advisory_locks} advisory locks left in pg_locks")
        if leftovers.idle_in_transaction:
            problems.append(f"{leftovers.idle_in_transaction} sessions left idle in transaction")
    if problems:
        return Check(4, "clean hand-over", False, "; ".join(problems))
    detail = "never more than 1 write in flight per key"
    if leftovers is not None:
        detail += "; no advisory lock and no idle-in-transaction session left"
    return Check(4, "clean hand-over", True, detail)


def check_cancellation(results: Sequence[WriteResult], rows: Sequence[LedgerRow]) -> Check:
    """Cancelled while queued: WITHDRAWN, no row. ROLLED_BACK: no row."""
    written = {(r.writer, r.writer_seq) for r in rows}
    queued = [r for r in results if r.cancelled_while_queued]
    problems = [
        f"{r.writer} #{r.seq} cancelled while queued ended {r.outcome.value}"
        for r in queued
        if r.outcome is not Outcome.WITHDRAWN
    ]
    rolled_back = [r for r in results if r.outcome is Outcome.ROLLED_BACK]
    problems += [
        f"{r.writer} #{r.seq} {r.outcome.value} but its ledger row exists"
        for r in (*queued, *rolled_back)
        if (r.writer, r.seq) in written
    ]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check(5, "cancellation", False, problems[0] + more)
    return Check(
        5,
        "cancellation",
        True,
        f"{len(queued)} cancelled while queued: all withdrawn, none written; "
        f"{len(rolled_back)} rolled back: none written",
    )


def check_outcome_truth(results: Sequence[WriteResult], rows: Sequence[LedgerRow]) -> Check:
    """The COMMITTED writes are exactly the ledger rows."""
    committed = {(r.writer, r.seq) for r in results if r.outcome is Outcome.COMMITTED}
    written = Counter((r.writer, r.writer_seq) for r in rows)
    doubled = sorted(w for w, n in written.items() if n > 1)
    missing = sorted(committed - set(written))
    unreported = sorted(set(written) - committed)
    problems = [f"{len(missing)} COMMITTED without a row"] if missing else []
    if unreported:
        problems.append(f"{len(unreported)} rows of writes not reported COMMITTED")
    if doubled:
        problems.append(f"{len(doubled)} writes with more than one row")
    if problems:
        first = (missing or unreported or doubled)[0]
        return Check(
            6, "outcome truth", False, "; ".join(problems) + f", e.g. {first[0]} #{first[1]}"
        )
    return Check(
        6, "outcome truth", True, f"COMMITTED handles = ledger rows ({len(committed)} writes)"
    )


def check_stats(stats: SerializerStats, results: Sequence[WriteResult], cancels_sent: int) -> Check:
    """stats() agrees with the handles; connections_invalidated stays under 1% of cancels."""
    seen = Counter(r.outcome for r in results)
    problems = [
        f"stats {name} {got}, handles {seen[outcome]}"
        for name, got, outcome in (
            ("committed", stats.committed, Outcome.COMMITTED),
            ("rolled_back", stats.rolled_back, Outcome.ROLLED_BACK),
            ("withdrawn", stats.withdrawn, Outcome.WITHDRAWN),
            ("unknown", stats.unknown, Outcome.UNKNOWN),
        )
        if got != seen[outcome]
    ]
    if stats.queued or stats.running:
        problems.append(f"{stats.queued} queued and {stats.running} running after the end")
    ended_by_cancel = seen[Outcome.ROLLED_BACK] + seen[Outcome.WITHDRAWN]
    if not ended_by_cancel <= stats.cancel_requests <= cancels_sent:
        problems.append(
            f"cancel_requests {stats.cancel_requests} outside {ended_by_cancel}..{cancels_sent} "
            "(writes ended by a cancellation .. cancellations sent)"
        )
    invalidated = stats.connections_invalidated
    if invalidated and invalidated >= 0.01 * stats.cancel_requests:
        problems.append(
            f"{invalidated} connections invalidated for {stats.cancel_requests} cancellations"
        )
    if problems:
        return Check(7, "stats", False, "; ".join(problems))
    return Check(
        7,
        "stats",
        True,
        f"counters match the handles; {stats.cancel_requests} cancellations cost "
        f"{invalidated} connections",
    )


# -- the report ------------------------------------------------------------------


@dataclass(frozen=True)
class DemoReport:
    """Everything the demo found; ``passed`` is True when every check passed.

    ``stalled`` counts the writes still unsettled when the time limit ran out;
    the run was then abandoned and ``checks`` is empty.
    """

    database: str  # redacted
    temporary: bool
    coordination: Coordination
    writers: tuple[str, ...]
    writes: int
    cancel_rate: float
    seed: int
    keys: tuple[str, ...]
    commit_order: str  # one letter per commit on the hot key, read from the ledger
    turn_order: str  # one letter per turn on the hot key; lowercase: it did not commit
    outcomes: Mapping[str, Mapping[Outcome, int]]
    cancels: Mapping[CancelMode, int]  # cancellations sent, by how
    checks: tuple[Check, ...]
    stats: SerializerStats
    elapsed: float
    unexpected: tuple[str, ...] = ()  # errors other than the demo's own cancellations
    stalled: int = 0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.failures

    @property
    def failures(self) -> tuple[str, ...]:
        """Problems outside the seven checks: a stalled run, unexpected errors."""
        found = list(self.unexpected[:3])
        if self.stalled:
            found.insert(
                0,
                f"{self.stalled} of {len(self.writers) * self.writes} writes still unsettled "
                f"after {self.elapsed:.0f} s; the run was abandoned",
            )
        return tuple(found)

    @property
    def letters(self) -> dict[str, str]:
        return letters_for(self.writers)


def letters_for(writers: Iterable[str]) -> dict[str, str]:
    """Writer name -> its letter in the strips: writer-1 is A."""
    return dict(zip(writers, string.ascii_uppercase, strict=False))


def format_report(report: DemoReport, *, quiet: bool = False) -> str:
    """The report as text a person reads at a glance."""
    parts = [] if quiet else [_header(report), _strips(report), _outcome_table(report)]
    parts.append(_verdicts(report))
    return "\n\n".join(parts)


def _header(r: DemoReport) -> str:
    where = " (temporary file, removed afterwards)" if r.temporary else ""
    others = len(r.keys) - 1
    keys = f'hot key "{HOT_KEY}"' + (f" + {others} other key{'s' * (others > 1)}" if others else "")
    sent = ", ".join(f"{r.cancels.get(m, 0)} {label}" for m, label in _CANCEL_LABELS)
    return "\n".join(
        [
            "writeturn demo",
            f"  database      {r.database}{where}",
            f"  coordination  {r.coordination}",
            f"  workload      {len(r.writers)} writers x {r.writes} writes, {keys}",
            f"  cancel rate   {r.cancel_rate:g} (seed {r.seed}): {sent}",
        ]
    )


_CANCEL_LABELS = (
    (CancelMode.QUEUED, "while queued"),
    (CancelMode.TASK, "task cancelled mid-write"),
    (CancelMode.TIMEOUT, "timed out mid-write"),
)


def _strips(r: DemoReport) -> str:
    legend = "  ".join(f"{letter}={w}" for w, letter in r.letters.items())
    return "\n".join(
        [
            _strip(f'Commit order on "{HOT_KEY}", read from the ledger', r.commit_order, ""),
            _strip("Turn order, from the turn log", r.turn_order, "; lowercase: no commit"),
            f"  {legend}",
        ]
    )


def _strip(title: str, letters: str, note: str) -> str:
    shown = letters[:STRIP_LENGTH]
    more = "..." if len(letters) > STRIP_LENGTH else ""
    return f"{title} (first {len(shown)} of {len(letters)}{note}):\n  {shown or '(none)'}{more}"


_OUTCOME_COLUMNS = (
    (Outcome.COMMITTED, "committed"),
    (Outcome.ROLLED_BACK, "rolled back"),
    (Outcome.WITHDRAWN, "withdrawn"),
    (Outcome.UNKNOWN, "unknown"),
)


def _outcome_table(r: DemoReport) -> str:
    width = max(len(w) for w in (*r.writers, "total")) + 2
    head = "Outcomes".ljust(width + 2) + "  ".join(label for _, label in _OUTCOME_COLUMNS)
    totals: Counter[Outcome] = Counter()
    lines = [head]
    for writer in r.writers:
        counts = r.outcomes.get(writer, {})
        totals.update(counts)
        lines.append(_outcome_line(f"{r.letters[writer]} {writer}", width, counts))
    lines.append(_outcome_line("  total", width, totals))
    return "\n".join(lines)


def _outcome_line(name: str, width: int, counts: Mapping[Outcome, int]) -> str:
    cells = "  ".join(str(counts.get(o, 0)).rjust(len(label)) for o, label in _OUTCOME_COLUMNS)
    return f"  {name.ljust(width)}{cells}"


def _verdicts(r: DemoReport) -> str:
    lines = ["Guarantees, checked against the database:"]
    lines += [
        f"  {'PASS' if c.passed else 'FAIL'}  {c.number} {c.name.ljust(17)} {c.detail}"
        for c in r.checks
    ]
    lines += [f"  FAIL  {problem}" for problem in r.failures]
    failed = sum(not c.passed for c in r.checks)
    if r.passed:
        verdict = f"All {len(r.checks)} guarantees hold"
    elif r.stalled:
        verdict = "The run stalled: no verdict on the guarantees"
    elif failed:
        verdict = f"{failed} of {len(r.checks)} guarantees FAILED"
    else:
        verdict = "Unexpected errors"
    lines.append(f"\n{verdict} ({r.elapsed:.1f} s).")
    return "\n".join(lines)


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
        return WriteResult(p.writer, p.seq, p.key, self.handle.outcome, self.cancelled_while_queued)


@dataclass
class _Recorder:
    """What the write functions note as they run: turns, writes in flight, due cancels."""

    ser: WriteSerializer
    turns: list[Turn] = field(default_factory=list)
    turn_count: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    due: dict[tuple[str, int], list[_Live]] = field(default_factory=dict)

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
        if live.plan.mode is CancelMode.TIMEOUT and live.scope is not None:
            live.cancel_sent = True
            live.scope.reschedule(asyncio.get_running_loop().time() + live.plan.deadline)

    def turn_ended(self, live: _Live) -> None:
        self.in_flight[live.plan.key] -= 1


def _cancel_if_queued(live: _Live) -> None:
    if live.handle is not None and live.handle.queued:
        live.cancelled_while_queued = live.cancel_sent = True
        live.handle.cancel()


def _cancel_awaiter(live: _Live, step: int) -> None:
    if live.plan.mode is CancelMode.TASK and live.plan.at_step == step and live.awaiter:
        live.cancel_sent = True
        live.awaiter.cancel()


async def _write(session: AsyncSession, rec: _Recorder, live: _Live) -> None:
    """Read the counter, pause, write value + 1 and a ledger row: racy without exclusion."""
    p = live.plan
    rec.turn_started(live)
    try:
        _cancel_awaiter(live, 0)
        found = await session.execute(select(counter.c.value).where(counter.c.key == p.key))
        value: int = found.scalar_one()
        _cancel_awaiter(live, 1)
        await asyncio.sleep(p.pause)
        await session.execute(update(counter).where(counter.c.key == p.key).values(value=value + 1))
        _cancel_awaiter(live, 2)
        await session.execute(
            insert(ledger).values(
                key=p.key, writer=p.writer, writer_seq=p.seq, balance_after=value + 1
            )
        )
    finally:
        rec.turn_ended(live)


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


async def _prepare(engine: AsyncEngine, keys: Iterable[str]) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_metadata.create_all)
        await conn.execute(delete(ledger))
        await conn.execute(delete(counter))
        await conn.execute(insert(counter), [{"key": k, "value": 0} for k in keys])


async def _read_back(engine: AsyncEngine) -> tuple[list[LedgerRow], dict[str, int]]:
    async with engine.connect() as conn:
        found = await conn.execute(select(ledger).order_by(ledger.c.id))
        rows = [LedgerRow(*r) for r in found]
        values = await conn.execute(select(counter.c.key, counter.c.value))
        counters = {k: v for k, v in values}
        await conn.rollback()
    return rows, counters


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


@dataclass(frozen=True)
class _Database:
    """What the database holds after the run."""

    rows: list[LedgerRow]
    counters: dict[str, int]
    leftovers: PgLeftovers | None


async def run_demo(options: DemoOptions) -> DemoReport:
    """Run the demo on ``options.url`` (or a temporary SQLite file) and check every guarantee."""
    if options.url is not None:
        return await _run(options, normalize_url(options.url), temporary=False)
    folder = tempfile.mkdtemp(prefix="writeturn-demo-")
    try:
        url = URL.create("sqlite+aiosqlite", database=str(Path(folder) / "demo.db"))
        return await _run(options, url, temporary=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _run(options: DemoOptions, url: URL, *, temporary: bool) -> DemoReport:
    postgres = backend_of(url) == "postgresql"
    engine_options: dict[str, Any] = {}
    if postgres:  # lets the leftover checks tell the demo's sessions from any others
        engine_options["connect_args"] = {"server_settings": {"application_name": APPLICATION_NAME}}
    ser = WriteSerializer.from_url(
        url, coordination=options.coordination, namespace=NAMESPACE, **engine_options
    )
    started = time.perf_counter()
    database: _Database | None = None
    async with ser:
        await _prepare(ser.engine, key_names(options.keys))
        rec = _Recorder(ser)
        lives = _submit_all(ser, rec, plan_writes(options))
        awaiters = [live.awaiter for live in lives if live.awaiter is not None]
        _, stalled = await asyncio.wait(awaiters, timeout=options.time_limit)
        unexpected = _unexpected(awaiters)
        stats = ser.stats()
        if stalled:
            await _abandon(ser)
        else:
            rows, counters = await _read_back(ser.engine)
            leftovers = await _pg_leftovers(ser.engine) if postgres else None
            database = _Database(rows, counters, leftovers)
    return _report(
        options,
        redact(url),
        temporary,
        lives,
        rec,
        stats,
        database,
        elapsed=time.perf_counter() - started,
        stalled=len(stalled),
        unexpected=unexpected,
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
    *,
    elapsed: float,
    stalled: int,
    unexpected: tuple[str, ...],
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


# -- command line ----------------------------------------------------------------------


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``writeturn demo`` to the CLI."""
    parser = sub.add_parser(
        "demo",
        help="watch writers race on one hot key, with cancellations; check every guarantee",
        description=(
            "Several writers queue many read-then-write updates on one hot key at once while "
            "a share of them is cancelled at random moments; then each guarantee is checked "
            "against the database."
        ),
        epilog="exit status: 0 every guarantee holds, 1 a check failed (or the run did), "
        "2 invalid usage",
    )
    parser.add_argument(
        "--url",
        type=_url_arg,
        default=None,
        help="database URL (default: a temporary SQLite file); a password in it is never printed",
    )
    parser.add_argument(
        "--writers",
        type=_int_arg("writers", 1, MAX_WRITERS),
        default=4,
        help="number of writers (default: %(default)s)",
    )
    parser.add_argument(
        "--writes",
        type=_int_arg("writes", 1, MAX_WRITES),
        default=50,
        help="writes each writer queues at once (default: %(default)s)",
    )
    parser.add_argument(
        "--cancel-rate",
        type=_rate_arg,
        default=0.3,
        metavar="RATE",
        help="share of the writes cancelled, from 0 to 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--coordination",
        choices=("turn", "advisory"),
        default="advisory",
        help="how writes are coordinated (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the random plan (default: %(default)s)"
    )
    parser.add_argument(
        "--keys",
        type=_int_arg("keys", 0, MAX_KEYS),
        default=1,
        help="other keys besides the hot one (default: %(default)s)",
    )
    parser.add_argument(
        "--time-limit",
        type=_seconds_arg,
        default=DEFAULT_TIME_LIMIT,
        metavar="SECONDS",
        help="give up (exit 1) if the writes have not settled by then (default: %(default)g)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only the guarantee lines and the verdict"
    )
    parser.set_defaults(func=_cli)


def _url_arg(value: str) -> str:
    try:
        normalize_url(value)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _int_arg(name: str, lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not lo <= number <= hi:
            raise argparse.ArgumentTypeError(
                f"{name} must be a whole number from {lo} to {hi}, got {value!r}"
            )
        return number

    parse.__name__ = name
    return parse


def _rate_arg(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if _rate_problem(rate):
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {value!r}")
    return rate


def _seconds_arg(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if _seconds_problem(seconds):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {value!r}")
    return seconds


def _cli(args: argparse.Namespace) -> int:
    options = DemoOptions(
        url=args.url,
        writers=args.writers,
        writes=args.writes,
        cancel_rate=args.cancel_rate,
        coordination=args.coordination,
        seed=args.seed,
        keys=args.keys,
        time_limit=args.time_limit,
    )
    try:
        report = _run_in_new_loop(options)
    except (WriteturnError, SQLAlchemyError, OSError) as exc:
        print(f"writeturn demo: error: {_describe(exc, args.url)}", file=sys.stderr)
        return 1
    print(format_report(report, quiet=args.quiet))
    return 0 if report.passed else 1


def _run_in_new_loop(options: DemoOptions) -> DemoReport:
    """``asyncio.run(run_demo(options))``, except that the tasks of a stalled run
    are left behind with the loop instead of being waited for forever."""
    loop = asyncio.new_event_loop()
    try:
        report = loop.run_until_complete(run_demo(options))
        if not report.stalled:
            _finish_loop(loop)
        return report
    except BaseException:
        _finish_loop(loop)
        raise
    finally:
        loop.close()


def _finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    leftover = asyncio.all_tasks(loop)
    if leftover:
        for task in leftover:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())


def _describe(exc: BaseException, url: str | None) -> str:
    """One line about ``exc``, with the URL's password masked."""
    line = (str(exc) or type(exc).__name__).splitlines()[0]
    password = normalize_url(url).password if url else None
    return line.replace(str(password), "***") if password else line
