"""The demo's plan: its options and limits, and who writes what, cancelled how (seeded)."""

from __future__ import annotations

import enum
import math
import random
import string
from collections import Counter
from dataclasses import dataclass

from ..._options import Coordination, is_seconds
from ...errors import ConfigurationError
from ...urls import normalize_url

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
