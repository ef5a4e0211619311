"""Turning results into text, JSON and plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TextIO

from ._model import STRATEGIES, BenchResults, CellResult, TargetResult

__all__ = [
    "format_cells",
    "format_targets",
    "format_memory",
    "print_results",
    "write_json",
    "write_plot",
    "latency_plot_path",
]

_COLUMNS = (
    ("workload", 8, "s"),
    ("writers", 7, "d"),
    ("cancel", 6, ".2f"),
    ("strategy", 9, "s"),
    ("writes/s", 9, ".0f"),
    ("p50 ms", 8, ".1f"),
    ("p99 ms", 8, ".1f"),
    ("max ms", 8, ".1f"),
    ("errors", 6, "d"),
    ("failed", 6, "d"),
    ("cancel'd", 8, "d"),
    ("lost", 5, "d"),
    ("truth", 5, "d"),
    ("inval", 5, "d"),
    ("leaked", 6, "d"),
    ("pool", 4, "d"),
    ("fair", 4, "d"),
)


def _row(c: CellResult) -> list[Any]:
    return [
        c.workload,
        c.writers,
        c.cancel_rate,
        c.strategy,
        c.writes_per_s,
        c.p50_ms,
        c.p99_ms,
        c.max_ms,
        c.errors,
        c.failed,
        c.cancelled,
        c.lost_updates,
        c.truth_violations,
        c.connections_invalidated,
        c.connections_leaked,
        c.pool_errors,
        c.fairness_run,
    ]


def format_cells(results: BenchResults, markdown: bool = False) -> str:
    """One table per database: a row per cell."""
    parts: list[str] = []
    for db in results.databases:
        cells = [c for c in results.cells if c.database == db]
        parts.append(f"## {db}" if markdown else f"== {db} ==")
        parts.append(_table(cells, markdown))
    return "\n".join(parts)


def _table(cells: list[CellResult], markdown: bool) -> str:
    heads = [name for name, _, _ in _COLUMNS]
    lines: list[list[str]] = []
    for c in cells:
        if c.status != "ok":
            head = [_fmt(v, f) for v, (_, _, f) in zip(_row(c)[:4], _COLUMNS, strict=False)]
            lines.append([*head, f"{c.status}: {c.note}"])
            continue
        lines.append([_fmt(v, f) for v, (_, _, f) in zip(_row(c), _COLUMNS, strict=True)])
    if markdown:
        out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out) + "\n"
    widths = [w for _, w, _ in _COLUMNS]
    out = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    for line in lines:
        out.append("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=False)))
    return "\n".join(out) + "\n"


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec)


def format_targets(targets: list[TargetResult], markdown: bool = False) -> str:
    heads = ["target", "database", "workload", "measured", "status", "detail"]
    rows = [[t.target, t.database, t.workload, _measured(t), t.status, t.detail] for t in targets]
    if markdown:
        out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out) + "\n"
    out = ["targets:"]
    for r in rows:
        out.append(f"  [{r[4]:>4}] {r[0]} | {r[1]} {r[2]}: {r[3]}" + (f" ({r[5]})" if r[5] else ""))
    return "\n".join(out) + "\n"


def _measured(t: TargetResult) -> str:
    if t.ratio is None:
        return "-"
    if t.target.startswith("memory"):
        return f"{t.ratio:.0f} B"
    return f"{t.ratio:.2f}x"


def format_memory(results: BenchResults) -> str:
    m = results.memory
    if m is None:
        return ""
    return (
        f"memory: {m.queued} writes queued behind a held turn: "
        f"{m.tracemalloc_bytes_per_write:.0f} B/write held (tracemalloc; peak "
        f"{m.tracemalloc_peak_bytes_per_write:.0f} B/write), RSS growth "
        f"{m.rss_bytes_per_write:.0f} B/write; submit() took "
        f"{m.submit_seconds / m.queued * 1e6:.1f} us each\n"
    )


def print_results(results: BenchResults, out: TextIO) -> None:
    """The cell tables, the memory figure and the targets, as text."""
    m = results.machine
    out.write(f"machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}\n")
    out.write(format_cells(results))
    out.write(format_memory(results))
    out.write(format_targets(results.targets))


def to_json(results: BenchResults) -> dict[str, Any]:
    data = dataclasses.asdict(results)
    for cell, obj in zip(data["cells"], results.cells, strict=True):
        cell["violations"] = obj.violations
    return data


def write_json(results: BenchResults, path: Path) -> None:
    path.write_text(json.dumps(to_json(results), indent=2) + "\n")


def latency_plot_path(path: Path) -> Path:
    """Where :func:`write_plot` puts the latency figure: ``FILE-latency.png`` by ``FILE.png``."""
    return path.with_name(f"{path.stem}-latency{path.suffix or '.png'}")


def write_plot(results: BenchResults, path: Path) -> None:
    """writes/s by writers, a line per strategy, a panel per database x workload (Agg)."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    rate = min((c.cancel_rate for c in results.cells), default=0.0)
    dbs = results.databases
    workloads = sorted({c.workload for c in results.cells}, key=_workload_order)
    fig, axes = plt.subplots(
        len(dbs), len(workloads), figsize=(4.2 * len(workloads), 3.2 * len(dbs)), squeeze=False
    )
    for i, db in enumerate(dbs):
        for j, wl in enumerate(workloads):
            _panel(axes[i][j], results, db, wl, rate)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"writeturn bench: committed writes/s (cancel rate {rate})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _workload_order(wl: str) -> int:
    order = ("insert", "counter", "transfer")
    return order.index(wl) if wl in order else len(order)


def _panel(ax: Any, results: BenchResults, db: str, wl: str, rate: float) -> None:
    for strategy in STRATEGIES:
        cells = sorted(
            (
                c
                for c in results.cells
                if (c.database, c.workload, c.strategy, c.cancel_rate) == (db, wl, strategy, rate)
                and c.status == "ok"
            ),
            key=lambda c: c.writers,
        )
        if cells:
            style = "--" if strategy in ("raw", "bulk") else "-"
            ax.plot(
                [c.writers for c in cells],
                [c.writes_per_s for c in cells],
                style,
                marker="o",
                markersize=3,
                label=strategy,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"{db} / {wl}", fontsize=9)
    ax.set_xlabel("writers", fontsize=8)
    ax.set_ylabel("writes/s", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.3)
