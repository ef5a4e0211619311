"""Turning results into text, JSON and plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, TextIO

from ._model import BASELINES, STRATEGIES, BenchResults, CellResult, TargetResult

__all__ = [
    "format_cells",
    "format_targets",
    "format_memory",
    "print_results",
    "write_json",
    "write_plot",
    "latency_plot_path",
    "plot_figures",
    "STRATEGY_COLOURS",
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
    ("cpu us", 6, ".0f"),
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
        c.cpu_us_per_write,
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


#: One colour per strategy, the same in every panel of every figure (matplotlib's tab10,
#: with writeturn's own strategies in the strongest colours).
STRATEGY_COLOURS: dict[str, str] = {
    "raw": "#7f7f7f",
    "bulk": "#bcbd22",
    "naive": "#8c564b",
    "lock": "#9467bd",
    "queue": "#17becf",
    "semaphore": "#e377c2",
    "turn": "#1f77b4",
    "advisory": "#ff7f0e",
    "batch": "#2ca02c",
}
#: Drawn for a strategy that broke an invariant in a panel: it is not a peer there.
INCORRECT_MARK = "incorrect"


def incorrect_note(cells: list[CellResult]) -> str | None:
    """Why these cells (one strategy, one panel) are not comparable, or None if they are."""
    lost = sum(c.lost_updates for c in cells)
    lied = sum(c.truth_violations for c in cells)
    parts = [f"lost {lost} updates"] if lost else []
    parts += [f"{lied} false outcomes"] if lied else []
    return ", ".join(parts) or None


def write_plot(results: BenchResults, path: Path) -> None:
    """Save the throughput figure to ``path`` and the latency figure beside it
    (:func:`latency_plot_path`); both drawn with matplotlib's Agg backend."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    throughput, latency = plot_figures(results)
    try:
        throughput.savefig(path, dpi=110)
        latency.savefig(latency_plot_path(path), dpi=110)
    finally:
        plt.close(throughput)
        plt.close(latency)


def plot_figures(results: BenchResults) -> tuple[Any, Any]:
    """The two figures, as matplotlib ``Figure`` objects (for tests and notebooks):
    committed writes/s by writers, and latency p50/p99 at the most writers."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    return _throughput_figure(results), _latency_figure(results)


def _grid(results: BenchResults) -> tuple[list[str], list[str], float]:
    rate = min((c.cancel_rate for c in results.cells), default=0.0)
    workloads = sorted({c.workload for c in results.cells}, key=_workload_order)
    return results.databases, workloads, rate


def _panel_cells(
    results: BenchResults, db: str, wl: str, rate: float, strategy: str
) -> list[CellResult]:
    return sorted(
        (
            c
            for c in results.cells
            if (c.database, c.workload, c.strategy, c.cancel_rate) == (db, wl, strategy, rate)
            and c.status == "ok"
        ),
        key=lambda c: c.writers,
    )


def _short(value: float, _: object = None) -> str:
    """1-2-5 tick labels a reader takes in at a glance: 50, 200, 1k, 20k."""
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _readable_log_axis(ax: Any) -> None:
    """Label a log y axis at 1-2-5 steps, or finer where it spans less than 20x, so that
    every panel shows at least three labelled values."""
    from matplotlib.ticker import (  # type: ignore[import-not-found, unused-ignore]
        FuncFormatter,
        LogLocator,
        NullFormatter,
    )

    low, high = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if high / max(low, 1e-9) > 20 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(_short))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _throughput_figure(results: BenchResults) -> Any:
    from matplotlib.figure import Figure  # type: ignore[import-not-found, unused-ignore]
    from matplotlib.lines import Line2D  # type: ignore[import-not-found, unused-ignore]

    dbs, workloads, rate = _grid(results)
    fig = Figure(figsize=(4.4 * len(workloads), 3.4 * len(dbs) + 1.1))
    axes = fig.subplots(len(dbs), len(workloads), squeeze=False)
    shown: list[str] = []
    for i, db in enumerate(dbs):
        for j, wl in enumerate(workloads):
            ax = axes[i][j]
            writers = sorted({c.writers for c in results.cells if c.workload == wl})
            for strategy in STRATEGIES:
                cells = _panel_cells(results, db, wl, rate, strategy)
                if not cells:
                    continue
                if strategy not in shown:
                    shown.append(strategy)
                _throughput_line(ax, strategy, cells)
            ax.set_xscale("log", base=2)
            ax.set_xticks(writers, [str(w) for w in writers])
            ax.minorticks_off()
            ax.set_yscale("log")
            _readable_log_axis(ax)
            ax.set_title(f"{db}: {wl}", fontsize=9)
            ax.set_xlabel("concurrent writers", fontsize=8)
            ax.set_ylabel("committed writes/s", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
    handles = [
        Line2D([], [], color=STRATEGY_COLOURS[s], linestyle=_style(s), marker="o", label=s)
        for s in shown
    ]
    handles.append(
        Line2D(
            [],
            [],
            color="#b0b0b0",
            linestyle=":",
            marker="x",
            label=f"{INCORRECT_MARK}: lost updates or false outcomes",
        )
    )
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(
        f"writeturn bench: committed writes/s by concurrent writers (cancel rate {rate:g}); "
        "dashed: sequential baselines",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1 if len(handles) > 6 else 0.06, 1, 0.96))
    return fig


def _style(strategy: str) -> Literal["-", "--"]:
    return "--" if strategy in BASELINES else "-"


def _throughput_line(ax: Any, strategy: str, cells: list[CellResult]) -> None:
    xs = [c.writers for c in cells]
    ys = [max(c.writes_per_s, 1e-3) for c in cells]
    colour = STRATEGY_COLOURS[strategy]
    note = incorrect_note(cells)
    if note is None:
        ax.plot(xs, ys, _style(strategy), color=colour, marker="o", markersize=3, label=strategy)
        return
    # Not a peer: faded, dotted, crossed, and named as incorrect where it ends.
    ax.plot(
        xs,
        ys,
        ":",
        color=colour,
        alpha=0.45,
        marker="x",
        markersize=5,
        label=f"{strategy} ({INCORRECT_MARK}: {note})",
    )
    ax.annotate(
        f"{strategy}: {INCORRECT_MARK}",
        (xs[-1], ys[-1]),
        textcoords="offset points",
        xytext=(-4, 4),
        ha="right",
        fontsize=6,
        color=colour,
    )


def _latency_figure(results: BenchResults) -> Any:
    from matplotlib.figure import Figure  # type: ignore[import-not-found, unused-ignore]
    from matplotlib.patches import Patch  # type: ignore[import-not-found, unused-ignore]
    from matplotlib.ticker import MaxNLocator  # type: ignore[import-not-found, unused-ignore]

    dbs, workloads, rate = _grid(results)
    most = max((c.writers for c in results.cells), default=1)
    concurrent = [s for s in STRATEGIES if s not in BASELINES]
    fig = Figure(figsize=(4.4 * len(workloads), 3.4 * len(dbs) + 1.1))
    axes = fig.subplots(len(dbs), len(workloads), squeeze=False)
    for i, db in enumerate(dbs):
        for j, wl in enumerate(workloads):
            ax = axes[i][j]
            cells = [
                c
                for s in concurrent
                for c in _panel_cells(results, db, wl, rate, s)
                if c.writers == most
            ]
            _latency_bars(ax, cells)
            ax.set_title(f"{db}: {wl}, {most} writers", fontsize=9)
            ax.set_ylabel("latency per write, ms", fontsize=8)
            # Linear from 0: a bar's length is then its value, which a log axis would hide.
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
            ax.tick_params(labelsize=7)
            ax.grid(True, axis="y", which="major", alpha=0.3)
    handles = [
        Patch(facecolor="#808080", label="p50"),
        Patch(facecolor="#808080", alpha=0.35, label="p99 (above p50)"),
        Patch(facecolor="white", edgecolor="#808080", hatch="xx", label=INCORRECT_MARK),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(
        f"writeturn bench: latency from submission to commit, p50 and p99, with {most} "
        f"concurrent writers (cancel rate {rate:g})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    return fig


def _latency_bars(ax: Any, cells: list[CellResult]) -> None:
    names: list[str] = []
    for x, c in enumerate(cells):
        colour = STRATEGY_COLOURS[c.strategy]
        wrong = incorrect_note([c]) is not None
        hatch = "xx" if wrong else None
        p50, p99 = c.p50_ms, max(c.p99_ms, c.p50_ms)
        ax.bar(x, p99, color=colour, alpha=0.35, hatch=hatch, edgecolor=colour, label=None)
        ax.bar(x, p50, color=colour, hatch=hatch, edgecolor=colour, label=c.strategy)
        names.append(f"{c.strategy}\n({INCORRECT_MARK})" if wrong else c.strategy)
    ax.set_xticks(range(len(cells)), names, rotation=45, ha="right")


def _workload_order(wl: str) -> int:
    order = ("insert", "counter", "transfer")
    return order.index(wl) if wl in order else len(order)
