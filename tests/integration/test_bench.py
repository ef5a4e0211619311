"""Smoke tests of ``writeturn bench``: every cell runs, and the bench tells a broken
strategy from writeturn. No timing assertions: only what the bench must always see."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from writeturn.cli import main
from writeturn.tools.bench import (
    STRATEGIES,
    WORKLOADS,
    BenchOptions,
    BenchResults,
    CellResult,
    batch_support,
    latency_plot_path,
    print_results,
    run_bench,
    write_json,
    write_plot,
)
from writeturn.tools.bench._report import plot_figures

WRITETURN = ("turn", "advisory", "batch")
SMOKE_WRITES = 40


def _assert_smoke(results: BenchResults, database: str) -> None:
    cells = [c for c in results.cells if c.database == database]
    assert len(cells) == len(WORKLOADS) * 2 * len(STRATEGIES)
    for c in cells:
        expected = "unavailable" if c.strategy == "batch" and batch_support() is None else "ok"
        assert c.status == expected, (c.strategy, c.workload, c.writers, c.note)
        if c.status != "ok":
            continue
        assert c.committed > 0 and c.writes_per_s > 0 and c.cpu_us_per_write > 0, c
        if c.strategy in WRITETURN:
            assert (c.errors, c.failed, c.lost_updates, c.truth_violations) == (0, 0, 0, 0), c
            assert c.committed == c.writes, c
    naive = results.cell(database, "counter", 8, "naive")
    assert naive is not None
    assert naive.lost_updates > 0 or naive.errors > 0, "the bench must catch naive's lost updates"


def test_sqlite_smoke_through_the_cli(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--url",
            sqlite_url,
            "--writes",
            str(SMOKE_WRITES),
            "--writers",
            "1,8",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    for strategy in STRATEGIES:
        assert f" {strategy} " in printed
    assert "targets:" in printed
    data = json.loads(out.read_text())
    assert len(data["cells"]) == len(WORKLOADS) * 2 * len(STRATEGIES)
    results = BenchResults(
        options=data["options"],
        machine=data["machine"],
        databases=data["databases"],
        cells=[],
        memory=None,
        targets=[],
    )
    for cell in data["cells"]:
        cell.pop("violations")
        results.cells.append(CellResult(**cell))
    _assert_smoke(results, "sqlite NORMAL")


@pytest.mark.postgres
async def test_postgres_smoke(pg_url: str, tmp_path: Path) -> None:
    results = await run_bench(BenchOptions(urls=[pg_url], writes=SMOKE_WRITES, writers=[1, 8]))
    assert results.databases == ["postgresql"]
    _assert_smoke(results, "postgresql")
    text = io.StringIO()
    print_results(results, text)
    for strategy in STRATEGIES:
        assert f" {strategy} " in text.getvalue()
    write_json(results, tmp_path / "pg.json")
    assert json.loads((tmp_path / "pg.json").read_text())["databases"] == ["postgresql"]


async def test_cancellations_keep_writeturn_invariants(sqlite_url: str) -> None:
    results = await run_bench(
        BenchOptions(
            urls=[sqlite_url],
            writes=96,
            writers=[8],
            workloads=["counter", "transfer"],
            strategies=[s for s in WRITETURN if s != "batch" or batch_support()],
            cancel_rates=[0.3],
        )
    )
    assert results.cells
    for c in results.cells:
        assert c.status == "ok", c.note
        assert (c.errors, c.failed, c.lost_updates, c.truth_violations) == (0, 0, 0, 0), c
    assert sum(c.cancelled for c in results.cells) > 0


async def test_memory_and_plot(sqlite_url: str, tmp_path: Path) -> None:
    results = await run_bench(
        BenchOptions(
            urls=[sqlite_url],
            writes=16,
            writers=[1, 8],
            workloads=["insert"],
            strategies=["raw", "turn"],
            memory_writes=5000,
        )
    )
    m = results.memory
    assert m is not None and m.queued == 5000
    assert math.isfinite(m.tracemalloc_bytes_per_write) and m.tracemalloc_bytes_per_write > 0
    assert any(
        t.target.startswith("memory") and t.status in ("PASS", "MISS") for t in results.targets
    )
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    write_plot(results, png)
    for saved in (png, latency_plot_path(png)):
        assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    throughput, latency = plot_figures(results)
    for ax in throughput.get_axes():
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8"]
        assert {line.get_label() for line in ax.get_lines()} == {"raw", "turn"}
    assert [t.get_text() for t in latency.get_axes()[0].get_xticklabels()] == ["turn"]
