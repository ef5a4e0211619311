"""``writeturn demo``: many writers race on one hot key; all eight guarantees are checked live.

Each writer queues all its writes at once; every write is a read-then-write
(read a counter, pause, store value + 1 and append a ledger row), the pattern
that loses updates without mutual exclusion. A seeded share of the writes is
cancelled: while queued (``handle.cancel()`` when a chosen turn on its key
starts), or while running (the task awaiting the handle is cancelled, or an
``asyncio.timeout`` around the await expires, at a chosen step of the write).
Another seeded share tries, from inside its turn, to start a second write
that would wait for that very turn (re-entrancy). After the race, writes with
``timeout=`` expire behind a held turn and in the middle of their function.
Then the ledger, the counters and the probe rows are read back and each
guarantee of :class:`~writeturn.WriteSerializer` is checked against them,
together with the counts: every planned cancellation and every write is
accounted for.

The same seed gives the same plan, and (cancellations land at turn numbers and
write steps, never at wall-clock moments) the same turns, outcomes and
verdicts; only the timings differ. On Postgres, keys other than the hot one
run in parallel, which leaves the per-key results the same.

The demo's tables (``writeturn_demo_*``) are its own: it creates them, and
drops them afterwards unless ``keep`` is set; the library's migrations never
touch them.

:func:`run_demo` runs the demo and returns a :class:`DemoReport`;
:func:`format_report` renders it; the ``check_*`` functions are pure, so they
can be tried on any data.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
import shutil
import string
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

from .._options import Coordination, is_seconds
from ..errors import ConfigurationError, ReentrantWriteError, TurnTimeout
from ..handle import WriteHandle
from ..outcome import Outcome
from ..serializer import WriteSerializer
from ..stats import SerializerStats
from ..urls import backend_of, normalize_url, redact

__all__ = [
    "DemoOptions",
    "DemoReport",
    "Check",
    "CancelMode",
    "LedgerRow",
    "ProbeRow",
    "Turn",
    "WriteResult",
    "Reentry",
    "TimedWrite",
    "PgLeftovers",
    "GUARANTEES",
    "run_demo",
    "format_report",
    "plan_writes",
    "check_mutual_exclusion",
    "check_order",
    "check_alternation",
    "check_handover",
    "check_cancellation",
    "check_outcome_truth",
    "check_reentrancy",
    "check_timeouts",
    "check_counts",
    "check_stats",
    "longest_run",
]

#: The README's guarantees, numbered as there.
GUARANTEES = (
    "mutual exclusion",
    "order",
    "alternation",
    "clean hand-over",
    "cancellation",
    "outcome truth",
    "re-entrancy",
    "timeouts",
)
HOT_KEY = "hot"
#: The key the timeout probes use (after the race, apart from its keys).
DEADLINE_KEY = "deadline"
#: The other key a re-entrant attempt tries on SQLite, where any key is re-entrant.
ELSEWHERE_KEY = "elsewhere"
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
#: Share of the uncancelled writes that try a re-entrant write inside their turn.
REENTER_SHARE = 0.1
#: Timeout probes: writes that expire behind a held turn, and inside their function.
TIMED_QUEUED, TIMED_RUNNING = 3, 3
QUEUED_TIMEOUT, RUNNING_TIMEOUT = 0.05, 0.1
#: Seconds between two progress reports.
PROGRESS_INTERVAL = 0.5

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


# -- options -------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs. ``url=None``: a temporary SQLite file, removed afterwards.
    ``keep``: leave the demo's tables in the database afterwards (they are dropped otherwise)."""

    url: str | None = None
    writers: int = 4
    writes: int = 50
    cancel_rate: float = 0.3
    coordination: Coordination = "advisory"
    seed: int = 7
    keys: int = 1
    time_limit: float = DEFAULT_TIME_LIMIT  # seconds the writes get to settle
    keep: bool = False

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
    ok = is_seconds(value, allow_zero=False)
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
    at_step: int  # TASK, TIMEOUT: 0 before the read, 1 after it, 2 between update and insert
    trigger_turn: int  # QUEUED: cancelled at the start of this turn on its key
    reenter: bool = False  # tries to start a write that would wait for its own turn


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
    reenter = rng.random() < REENTER_SHARE  # drawn always, so the plan's shape is stable
    return PlannedWrite(
        writer=writer,
        seq=seq,
        key=key,
        mode=mode,
        pause=0.0 if rng.random() < 0.5 else rng.uniform(0, 0.001),
        at_step=rng.randrange(3),
        trigger_turn=rng.randrange(max(1, expected_turn)),
        reenter=reenter and mode is CancelMode.NONE,
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
class ProbeRow:
    """A row a re-entrant attempt (``kind="reentrant"``) or a timeout probe
    (``kind="timeout"``) wrote; only the holder and the follow-up probe may commit."""

    kind: str
    name: str


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
    """How one write ended, as its handle reports it; what was planned for it, whether the
    planned cancellation was sent, and what its awaiting task raised (``""``: nothing)."""

    writer: str
    seq: int
    key: str
    outcome: Outcome
    cancelled_while_queued: bool = False
    planned: CancelMode = CancelMode.NONE
    cancel_sent: bool = False
    raised: str = ""


@dataclass(frozen=True)
class Reentry:
    """One write's attempt, inside its turn on ``key``, to start a write on ``inner_key``:
    ``raised`` names what the attempt raised (``""``: nothing, so the write was queued)."""

    writer: str
    seq: int
    key: str
    inner_key: str
    raised: str


@dataclass(frozen=True)
class TimedWrite:
    """A write submitted with ``timeout=``: where it was meant to expire (``"queued"`` behind
    a held turn, ``"running"`` inside its function), whether its function started, what
    awaiting it raised, and its outcome."""

    name: str
    meant: str
    timeout: float
    started: bool
    raised: str
    outcome: Outcome


@dataclass(frozen=True)
class PgLeftovers:
    """What a Postgres database still holds for the demo's sessions after the run."""

    advisory_locks: int
    idle_in_transaction: int


@dataclass(frozen=True)
class Check:
    """One line of the verdict: guarantee ``number`` (1..8), or 0 for the bookkeeping."""

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
    """Cancelled while queued: WITHDRAWN, no row. ROLLED_BACK: no row. A cancelled awaiting
    task ends in CancelledError; an expired ``asyncio.timeout`` still raises TimeoutError."""
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
    expected = {CancelMode.TASK: "CancelledError", CancelMode.TIMEOUT: "TimeoutError"}
    mid_write = [
        r
        for r in results
        if r.cancel_sent and r.planned in expected and r.outcome is not Outcome.COMMITTED
    ]
    problems += [
        f"{r.writer} #{r.seq}: {r.planned.value} cancellation raised {r.raised or 'nothing'}, "
        f"not {expected[r.planned]}"
        for r in mid_write
        if r.raised != expected[r.planned]
    ]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check(5, "cancellation", False, problems[0] + more)
    timeouts = sum(r.planned is CancelMode.TIMEOUT for r in mid_write)
    return Check(
        5,
        "cancellation",
        True,
        f"{len(queued)} cancelled while queued: all withdrawn, none written; "
        f"{len(rolled_back)} rolled back: none written"
        + (f"; {timeouts} asyncio.timeout expiries raised TimeoutError" if timeouts else ""),
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


def check_reentrancy(
    attempts: Sequence[Reentry], probes: Sequence[ProbeRow], results: Sequence[WriteResult]
) -> Check:
    """Every attempt raised ReentrantWriteError at once, its write never ran (no probe row),
    and the write that made the attempt went on and committed."""
    outcome = {(r.writer, r.seq): r.outcome for r in results}
    problems = [
        f"{a.writer} #{a.seq} starting a write on {a.inner_key} inside its turn on {a.key} "
        f"raised {a.raised or 'nothing (the write was queued behind its own turn)'}"
        for a in attempts
        if a.raised != ReentrantWriteError.__name__
    ]
    ran = [p.name for p in probes if p.kind == "reentrant"]
    if ran:
        problems.append(f"{len(ran)} re-entrant writes ran and committed, e.g. {ran[0]}")
    problems += [
        f"{a.writer} #{a.seq} ended {outcome[(a.writer, a.seq)].value} after its attempt"
        for a in attempts
        if outcome.get((a.writer, a.seq)) is not Outcome.COMMITTED
    ]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check(7, "re-entrancy", False, problems[0] + more)
    if not attempts:
        return Check(7, "re-entrancy", True, "no write was planned to try (a short run)")
    others = sum(a.inner_key != a.key for a in attempts)
    also = f" ({others} on another key: SQLite has one writer)" if others else ""
    return Check(
        7,
        "re-entrancy",
        True,
        f"{len(attempts)} writes tried to start a write inside their own turn{also}: each "
        "raised ReentrantWriteError at once, nothing ran, the outer writes committed",
    )


def check_timeouts(timed: Sequence[TimedWrite], probes: Sequence[ProbeRow]) -> Check:
    """Each timed write raised TurnTimeout (a TimeoutError), ended WITHDRAWN if its function
    never started and ROLLED_BACK if it did, and left no row; the key served on afterwards."""
    problems = [
        f"{t.name} raised {t.raised or 'nothing'}, not TurnTimeout"
        for t in timed
        if t.raised != TurnTimeout.__name__
    ]
    problems += [
        f"{t.name} ended {t.outcome.value} although its function "
        f"{'started' if t.started else 'never started'}"
        for t in timed
        if t.outcome is not (Outcome.ROLLED_BACK if t.started else Outcome.WITHDRAWN)
    ]
    names = Counter(p.name for p in probes if p.kind == "timeout")
    problems += [f"{t.name} timed out but its row exists" for t in timed if names[t.name]]
    if names["holder"] != 1 or names["after"] != 1:
        problems.append(
            f"the writes before and after the timeouts left {names['holder']} and "
            f"{names['after']} rows, not 1 and 1"
        )
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check(8, "timeouts", False, problems[0] + more)
    queued = [t for t in timed if not t.started]
    running = [t for t in timed if t.started]
    return Check(
        8,
        "timeouts",
        True,
        f"{len(timed)} writes with timeout= raised TurnTimeout: {len(queued)} expired in the "
        f"queue (withdrawn), {len(running)} inside their function (rolled back); none written, "
        "the next write on the key committed",
    )


def check_counts(results: Sequence[WriteResult], total: int) -> Check:
    """Every write has one outcome; every planned cancellation was sent, or its write ran
    before the cancellation's moment (and committed); every write nobody cancelled committed."""
    problems: list[str] = []
    if len(results) != total:
        problems.append(f"{len(results)} outcomes for {total} writes")
    planned = [r for r in results if r.planned is not CancelMode.NONE]
    unsent = [r for r in planned if not r.cancel_sent]
    problems += [
        f"{r.writer} #{r.seq}: its {r.planned.value} cancellation was never sent, yet it "
        f"ended {r.outcome.value}"
        for r in unsent
        if r.outcome is not Outcome.COMMITTED
    ]
    problems += [
        f"{r.writer} #{r.seq}: nobody cancelled it, yet it ended {r.outcome.value}"
        for r in results
        if r.planned is CancelMode.NONE and r.outcome is not Outcome.COMMITTED
    ]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check(0, "counts", False, problems[0] + more)
    seen = Counter(r.outcome for r in results)
    parts = " + ".join(f"{seen[o]} {label}" for o, label in _OUTCOME_COLUMNS if seen[o])
    sent = len(planned) - len(unsent)
    return Check(
        0,
        "counts",
        True,
        f"{total} writes = {parts or '0'}; {len(planned)} cancellations planned = {sent} sent "
        f"+ {len(unsent)} whose write had already run (committed); "
        "every write nobody cancelled committed",
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
        return Check(0, "stats", False, "; ".join(problems))
    return Check(
        0,
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
    results: tuple[WriteResult, ...] = ()  # every write of the race, in submission order
    kept: bool = False  # the demo's tables were left in the database

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.failures

    @property
    def planned(self) -> dict[CancelMode, int]:
        """Cancellations planned, by how."""
        return dict(Counter(r.planned for r in self.results if r.planned is not CancelMode.NONE))

    @property
    def failures(self) -> tuple[str, ...]:
        """Problems outside the checks: a stalled run, unexpected errors."""
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
    parts = (
        []
        if quiet
        else [_header(report), _strips(report), _outcome_table(report), _cancel_table(report)]
    )
    parts.append(_verdicts(report))
    return "\n\n".join(parts)


def _header(r: DemoReport) -> str:
    if r.temporary:
        where = " (temporary file, removed afterwards)"
    else:
        where = " (the demo's tables kept)" if r.kept else " (the demo's tables dropped afterwards)"
    others = len(r.keys) - 1
    keys = f'hot key "{HOT_KEY}"' + (f" + {others} other key{'s' * (others > 1)}" if others else "")
    planned = r.planned
    sent = f"{sum(planned.values())} cancellations planned: " + ", ".join(
        f"{planned.get(m, 0)} {label}" for m, label in _CANCEL_LABELS
    )
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


def _cancel_table(r: DemoReport) -> str:
    """Planned cancellations against outcomes: each row adds up to its planned count."""
    rows: list[tuple[str, list[WriteResult]]] = [
        (label, [x for x in r.results if x.planned is mode]) for mode, label in _CANCEL_LABELS
    ]
    rows.append(("not cancelled", [x for x in r.results if x.planned is CancelMode.NONE]))
    rows.append(("all writes", list(r.results)))
    width = max(len(label) for label, _ in rows) + 2
    heads = ["planned", "sent", *(label for _, label in _OUTCOME_COLUMNS)]
    lines = ["Cancellations".ljust(width + 2) + "  ".join(heads)]
    for label, found in rows:
        cancelled = label not in ("not cancelled", "all writes")
        outcomes = Counter(x.outcome for x in found)
        cells = [
            str(len(found)),
            str(sum(x.cancel_sent for x in found)) if cancelled else "-",
            *(str(outcomes[o]) for o, _ in _OUTCOME_COLUMNS),
        ]
        lines.append(
            f"  {label.ljust(width)}"
            + "  ".join(c.rjust(len(h)) for c, h in zip(cells, heads, strict=True))
        )
    lines.append(
        "  (a planned cancellation is not sent when its write had already run; it committed)"
    )
    return "\n".join(lines)


def _outcome_line(name: str, width: int, counts: Mapping[Outcome, int]) -> str:
    cells = "  ".join(str(counts.get(o, 0)).rjust(len(label)) for o, label in _OUTCOME_COLUMNS)
    return f"  {name.ljust(width)}{cells}"


def _verdicts(r: DemoReport) -> str:
    lines = ["Guarantees, checked against the database:"]
    lines += [
        f"  {'PASS' if c.passed else 'FAIL'}  {c.number or ' '} {c.name.ljust(17)} {c.detail}"
        for c in r.checks
    ]
    lines += [f"  FAIL  {problem}" for problem in r.failures]
    guarantees = [c for c in r.checks if c.number]
    failed = sum(not c.passed for c in guarantees)
    books = [c.name for c in r.checks if not c.number and not c.passed]
    if r.passed:
        verdict = f"All {len(guarantees)} guarantees hold, and the counts add up"
    elif r.stalled:
        verdict = "The run stalled: no verdict on the guarantees"
    elif failed:
        verdict = f"{failed} of {len(guarantees)} guarantees FAILED"
    elif books:
        verdict = f"The guarantees hold, but the {' and the '.join(books)} do not add up"
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
