"""What the demo's checks look at, and the checks themselves: pure functions of it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...errors import ReentrantWriteError, TurnTimeout
from ...outcome import Outcome
from ...stats import SerializerStats
from ._plan import HOT_KEY, CancelMode

#: The outcomes in the order the report and the checks list them.
_OUTCOME_COLUMNS = (
    (Outcome.COMMITTED, "committed"),
    (Outcome.ROLLED_BACK, "rolled back"),
    (Outcome.WITHDRAWN, "withdrawn"),
    (Outcome.UNKNOWN, "unknown"),
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
