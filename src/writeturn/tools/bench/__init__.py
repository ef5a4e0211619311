"""``writeturn bench``: writeturn against the usual ways of writing concurrently.

The same workloads (``insert``, ``counter``, ``transfer``) run through each
strategy (``raw``, ``bulk``, ``naive``, ``lock``, ``queue``, ``semaphore``, and
writeturn's ``turn``, ``advisory`` and ``batch``) with 1, 8 and 64 concurrent
writers, optionally cancelling a share of the writes. Each cell reports
writes/s, latency percentiles, errors, cancellations, invariant violations
(lost updates, outcome truth), invalidated and leaked connections, and a
fairness figure; the run ends with the project's targets as measured ratios.

Programmatic use::

    results = await run_bench(BenchOptions(writes=500, writers=[1, 8]))
    for cell in results.cells: ...
"""

from __future__ import annotations

from ._memory import measure_memory
from ._model import (
    STRATEGIES,
    TEMP_SQLITE,
    WORKLOADS,
    BenchOptions,
    BenchResults,
    CellResult,
    MemoryResult,
    TargetResult,
)
from ._report import latency_plot_path, print_results, to_json, write_json, write_plot
from ._run import run_bench
from ._strategies import Database, batch_support

__all__ = [
    "run_bench",
    "BenchOptions",
    "BenchResults",
    "CellResult",
    "MemoryResult",
    "TargetResult",
    "STRATEGIES",
    "WORKLOADS",
    "TEMP_SQLITE",
    "Database",
    "batch_support",
    "measure_memory",
    "print_results",
    "latency_plot_path",
    "to_json",
    "write_json",
    "write_plot",
]
