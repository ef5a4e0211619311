"""The bench's inputs and results: plain dataclasses, so tests never parse text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BenchOptions",
    "BenchResults",
    "CellResult",
    "MemoryResult",
    "TargetResult",
    "Progress",
    "STRATEGIES",
    "WORKLOADS",
    "BASELINES",
    "WRITETURN_STRATEGIES",
    "TEMP_SQLITE",
]

#: Every strategy, in the order tables and plots show them.
STRATEGIES = ("raw", "bulk", "naive", "lock", "queue", "semaphore", "turn", "advisory", "batch")
#: Strategies that run the writes one after another, ignoring the writers' concurrency.
BASELINES = ("raw", "bulk")
#: The strategies that are writeturn itself.
WRITETURN_STRATEGIES = ("turn", "advisory", "batch")
WORKLOADS = ("insert", "counter", "transfer")
#: The ``--url`` value that means "a temporary SQLite file" (the default).
TEMP_SQLITE = "sqlite"

#: Called after each cell: (cells done, cells in all, what just ran).
Progress = Callable[[int, int, str], None]


@dataclass
class BenchOptions:
    """What to run. Every list is run in full: databases x workloads x writers x rates x
    strategies."""

    urls: list[str] = field(default_factory=lambda: [TEMP_SQLITE])
    sqlite_synchronous: list[str] = field(default_factory=lambda: ["NORMAL"])
    writes: int = 2000
    writers: list[int] = field(default_factory=lambda: [1, 8, 64])
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    cancel_rates: list[float] = field(default_factory=lambda: [0.0])
    seed: int = 1
    #: Writes each writer submits at once before waiting for them (for the fairness metric).
    burst: int = 8
    #: Measure the memory of queued writes with this many writes (0: skip).
    memory_writes: int = 0
    progress: Progress | None = None


@dataclass
class CellResult:
    """One strategy on one workload with one number of writers, from fresh tables."""

    database: str
    workload: str
    writers: int
    cancel_rate: float
    strategy: str
    status: Literal["ok", "unavailable", "failed"] = "ok"
    note: str = ""
    writes: int = 0
    committed: int = 0
    elapsed_s: float = 0.0
    writes_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    #: Database errors seen, each attempt counted (a retried error counts too).
    errors: int = 0
    #: Writes that ended in an error (not a cancellation).
    failed: int = 0
    #: Writes whose task ended cancelled.
    cancelled: int = 0
    #: Counter: increments lost (rows logged minus the counters' sum);
    #: transfer: how far the total drifted; insert: 0.
    lost_updates: int = 0
    #: Writes reported done that left no row, plus rows of writes not reported done.
    truth_violations: int = 0
    connections_invalidated: int = 0
    #: Connections still checked out of the pool after the strategy shut down.
    connections_leaked: int = 0
    #: Errors SQLAlchemy's pool logged while resetting or returning connections.
    pool_errors: int = 0
    #: Longest run of consecutive commits by one writer while another writer waited.
    fairness_run: int = 0
    #: CPU time of the bench's own process (every thread: aiosqlite's too) while the
    #: writes ran, per committed write, in microseconds. The database server's CPU is
    #: not in it. Steadier than writes/s on a shared machine: other programs' load
    #: stretches the wall time far more than this process's own work.
    cpu_us_per_write: float = 0.0

    @property
    def violations(self) -> int:
        return self.lost_updates + self.truth_violations


@dataclass
class MemoryResult:
    """Memory held per write queued behind a held turn."""

    queued: int
    tracemalloc_bytes_per_write: float
    tracemalloc_peak_bytes_per_write: float
    rss_bytes_per_write: float
    submit_seconds: float


@dataclass
class TargetResult:
    """One target of the project's issue, measured as a ratio within one run."""

    target: str
    database: str
    workload: str
    ratio: float | None
    threshold: float
    status: Literal["PASS", "MISS", "N/A", "INFO"]
    detail: str = ""


@dataclass
class BenchResults:
    options: dict[str, Any]
    machine: dict[str, Any]
    databases: list[str]
    cells: list[CellResult]
    memory: MemoryResult | None
    targets: list[TargetResult]

    def cell(
        self, database: str, workload: str, writers: int, strategy: str, cancel_rate: float = 0.0
    ) -> CellResult | None:
        for c in self.cells:
            if (c.database, c.workload, c.writers, c.strategy, c.cancel_rate) == (
                database,
                workload,
                writers,
                strategy,
                cancel_rate,
            ):
                return c
        return None
