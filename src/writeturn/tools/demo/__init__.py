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

The code is in four parts: ``_plan`` (options and the seeded plan), ``_run`` (the
race, the probes, the read-back), ``_checks`` (pure) and ``_report``.
"""

from __future__ import annotations

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
    longest_run,
)
from ._plan import (
    DEFAULT_TIME_LIMIT,
    GUARANTEES,
    HOT_KEY,
    MAX_KEYS,
    MAX_WRITERS,
    MAX_WRITES,
    CancelMode,
    DemoOptions,
    plan_writes,
)
from ._report import DemoReport, format_report
from ._run import run_demo

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
    "HOT_KEY",
    "DEFAULT_TIME_LIMIT",
    "MAX_KEYS",
    "MAX_WRITERS",
    "MAX_WRITES",
]
