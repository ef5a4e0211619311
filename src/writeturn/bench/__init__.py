"""Re-exports ``writeturn.tools.bench``, where the benchmark's code lives."""

from __future__ import annotations

from writeturn.tools.bench import (
    STRATEGIES,
    TEMP_SQLITE,
    WORKLOADS,
    BenchOptions,
    BenchResults,
    CellResult,
    Database,
    MemoryResult,
    TargetResult,
    batch_support,
    latency_plot_path,
    measure_memory,
    print_results,
    run_bench,
    to_json,
    write_json,
    write_plot,
)

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
