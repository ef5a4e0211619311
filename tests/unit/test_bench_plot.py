"""The bench's figures, checked on the matplotlib objects: writer counts on the x axis, one
colour per strategy in every panel, at least three labelled y values, strategies that broke
an invariant marked incorrect, and a latency figure at the most writers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from writeturn.tools.bench import BenchResults, CellResult, latency_plot_path, write_plot
from writeturn.tools.bench._report import STRATEGY_COLOURS, plot_figures

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_hex  # noqa: E402

WRITERS = (1, 8, 64)
DATABASES = ("sqlite NORMAL", "postgresql")
WORKLOADS = ("insert", "counter")
STRATEGIES = ("raw", "naive", "lock", "turn", "advisory")


def cell(db: str, wl: str, writers: int, strategy: str) -> CellResult:
    # Made-up but shaped like a run: naive loses updates on the counter under contention.
    rate = 1000.0 * (1 + STRATEGIES.index(strategy)) / (1 + writers / 64)
    lost = 40 * writers if strategy == "naive" and wl == "counter" and writers > 1 else 0
    return CellResult(
        database=db,
        workload=wl,
        writers=writers,
        cancel_rate=0.0,
        strategy=strategy,
        writes=500,
        committed=500,
        writes_per_s=rate,
        p50_ms=writers / 2 + STRATEGIES.index(strategy),
        p99_ms=writers * 3 + STRATEGIES.index(strategy),
        lost_updates=lost,
    )


@pytest.fixture
def results() -> BenchResults:
    cells = [
        cell(db, wl, w, s)
        for db in DATABASES
        for wl in WORKLOADS
        for w in WRITERS
        for s in STRATEGIES
    ]
    return BenchResults({}, {}, list(DATABASES), cells, None, [])


def panel_lines(ax: Any) -> dict[str, Any]:
    return {line.get_label().split(" ")[0]: line for line in ax.get_lines()}


def visible_labels(ax: Any) -> list[str]:
    low, high = ax.get_ylim()
    ticks = ax.yaxis.get_major_locator().tick_values(low, high)
    formatter = ax.yaxis.get_major_formatter()
    return [formatter(t) for t in ticks if low <= t <= high]


def test_throughput_figure(results: BenchResults) -> None:
    throughput, _ = plot_figures(results)
    axes = throughput.get_axes()
    assert len(axes) == len(DATABASES) * len(WORKLOADS)
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "64"]
        assert ax.get_xlabel() == "concurrent writers"
        assert len(visible_labels(ax)) >= 3, visible_labels(ax)
        lines = panel_lines(ax)
        assert set(lines) == set(STRATEGIES)
        for strategy, line in lines.items():
            assert to_hex(line.get_color()) == STRATEGY_COLOURS[strategy]
            assert list(line.get_xdata()) == list(WRITERS)
        counter = "counter" in ax.get_title()
        naive = lines["naive"].get_label()
        assert ("incorrect: lost" in naive) is counter, naive
        assert ("lost 2880 updates" in naive) is counter  # 40 * (8 + 64)
        assert lines["naive"].get_linestyle() == (":" if counter else "-")
        assert lines["raw"].get_linestyle() == "--"  # a sequential baseline
        assert all("incorrect" not in lines[s].get_label() for s in ("lock", "turn", "advisory"))
    legend = throughput.legends[0]
    assert [t.get_text() for t in legend.get_texts()][: len(STRATEGIES)] == list(STRATEGIES)


def test_latency_figure(results: BenchResults) -> None:
    _, latency = plot_figures(results)
    axes = latency.get_axes()
    assert len(axes) == len(DATABASES) * len(WORKLOADS)
    for ax in axes:
        assert "64 writers" in ax.get_title()
        names = [t.get_text() for t in ax.get_xticklabels()]
        concurrent = [s for s in STRATEGIES if s != "raw"]  # no contention in a baseline
        if "counter" in ax.get_title():
            assert names == [s if s != "naive" else "naive\n(incorrect)" for s in concurrent]
        else:
            assert names == concurrent
        bars = ax.patches
        assert len(bars) == 2 * len(concurrent)  # p99 behind p50
        heights = {(to_hex(b.get_facecolor()[:3]), round(b.get_height(), 3)) for b in bars}
        assert (STRATEGY_COLOURS["turn"], 64 / 2 + 3) in heights  # turn's p50 at 64 writers
        assert (STRATEGY_COLOURS["turn"], 64 * 3 + 3) in heights  # and its p99


def test_write_plot_saves_both_figures(results: BenchResults, tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    write_plot(results, path)
    second = latency_plot_path(path)
    assert second == tmp_path / "bench-latency.png"
    for saved in (path, second):
        assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
