"""The issue's targets, each a ratio of two figures measured in the same run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from ._model import CellResult, MemoryResult, TargetResult

__all__ = ["compute_targets", "MEMORY_TARGET_BYTES"]

MEMORY_TARGET_BYTES = 384
TURN_VS_RAW = 0.95
ADVISORY_VS_BEST = 1.0
BATCH_VS_TURN = 3.0
BATCH_VS_BULK = 0.85
CANCEL_KEEPS = 0.85

Status = Literal["PASS", "MISS", "N/A", "INFO"]
Find = Callable[[str, int, str, float], CellResult | None]


def compute_targets(
    cells: list[CellResult], databases: list[str], memory: MemoryResult | None
) -> list[TargetResult]:
    """Every target for every database and workload the run has the cells for."""
    index = {(c.database, c.workload, c.writers, c.strategy, c.cancel_rate): c for c in cells}
    out: list[TargetResult] = []
    for db in databases:

        def find(wl: str, w: int, s: str, rate: float = 0.0, db: str = db) -> CellResult | None:
            c = index.get((db, wl, w, s, rate))
            return c if c is not None and c.status == "ok" else None

        workloads = sorted({c.workload for c in cells if c.database == db})
        writers = sorted({c.writers for c in cells if c.database == db})
        rates = sorted({c.cancel_rate for c in cells if c.database == db and c.cancel_rate > 0})
        if not writers:
            continue
        lo, hi = writers[0], writers[-1]
        for wl in workloads:
            if lo == 1:
                out.append(_turn_vs_raw(find, db, wl, lo))
            out.append(_advisory_vs_best(find, db, wl, hi))
            out.append(_batch_vs_turn(find, db, wl, hi))
            out.append(_batch_vs_bulk(find, db, wl, hi))
            for rate in rates:
                for s in ("turn", "advisory", "batch"):
                    out.append(_cancel_keeps(find, db, wl, hi, s, rate))
    out.append(_memory(memory))
    return out


def _ratio(a: CellResult | None, b: CellResult | None) -> float | None:
    if a is None or b is None or b.writes_per_s <= 0:
        return None
    return a.writes_per_s / b.writes_per_s


def _status(ratio: float | None, threshold: float, ok: bool = True) -> Status:
    if ratio is None:
        return "N/A"
    return "PASS" if ratio >= threshold and ok else "MISS"


def _clean(c: CellResult) -> bool:
    return c.errors == 0 and c.failed == 0 and c.violations == 0


def _turn_vs_raw(find: Find, db: str, wl: str, w: int) -> TargetResult:
    turn, raw = find(wl, w, "turn", 0.0), find(wl, w, "raw", 0.0)
    r = _ratio(turn, raw)
    detail = ""
    if turn is not None and raw is not None:
        detail = f"turn {turn.writes_per_s:.0f}/s vs raw {raw.writes_per_s:.0f}/s"
    return TargetResult(
        f"turn @{w} writer >= {TURN_VS_RAW}x raw",
        db,
        wl,
        r,
        TURN_VS_RAW,
        _status(r, TURN_VS_RAW),
        detail,
    )


def _advisory_vs_best(find: Find, db: str, wl: str, w: int) -> TargetResult:
    adv = find(wl, w, "advisory", 0.0)
    rivals = [c for s in ("lock", "queue", "semaphore") if (c := find(wl, w, s, 0.0))]
    best = max(rivals, key=lambda c: c.writes_per_s) if rivals else None
    r = _ratio(adv, best)
    naive = find(wl, w, "naive", 0.0)
    detail = ""
    if adv is not None and best is not None:
        detail = (
            f"advisory {adv.writes_per_s:.0f}/s errors {adv.errors} violations "
            f"{adv.violations}; best {best.strategy} {best.writes_per_s:.0f}/s"
        )
    if naive is not None:
        detail += f"; naive errors {naive.errors} lost {naive.lost_updates}"
    ok = adv is not None and _clean(adv)
    return TargetResult(
        f"advisory @{w} >= {ADVISORY_VS_BEST}x best of lock/queue/semaphore, 0 errors",
        db,
        wl,
        r,
        ADVISORY_VS_BEST,
        _status(r, ADVISORY_VS_BEST, ok),
        detail,
    )


def _applies_to_batch(db: str) -> bool:
    return db.startswith("postgresql") or "FULL" in db


def _batch_vs_turn(find: Find, db: str, wl: str, w: int) -> TargetResult:
    batch, turn = find(wl, w, "batch", 0.0), find(wl, w, "turn", 0.0)
    r = _ratio(batch, turn)
    status = _status(r, BATCH_VS_TURN, batch is not None and _clean(batch))
    if status != "N/A" and not _applies_to_batch(db):
        status = "INFO"  # the target is set for Postgres and SQLite FULL only
    detail = "" if r is not None else _why_missing(find(wl, w, "batch", 0.0), "batch")
    return TargetResult(
        f"batch @{w} >= {BATCH_VS_TURN}x turn",
        db,
        wl,
        r,
        BATCH_VS_TURN,
        status,
        detail,
    )


def _batch_vs_bulk(find: Find, db: str, wl: str, w: int) -> TargetResult:
    batch, bulk = find(wl, w, "batch", 0.0), find(wl, w, "bulk", 0.0)
    r = _ratio(batch, bulk)
    status = _status(r, BATCH_VS_BULK, batch is not None and _clean(batch))
    if status != "N/A" and not _applies_to_batch(db):
        status = "INFO"  # the target is set for Postgres and SQLite FULL only
    return TargetResult(
        f"batch @{w} >= {BATCH_VS_BULK}x bulk",
        db,
        wl,
        r,
        BATCH_VS_BULK,
        status,
        "" if r is not None else "batch unavailable or not run",
    )


def _why_missing(c: CellResult | None, name: str) -> str:
    return f"{name} unavailable or not run" if c is None else ""


def _cancel_keeps(find: Find, db: str, wl: str, w: int, s: str, rate: float) -> TargetResult:
    cut, base = find(wl, w, s, rate), find(wl, w, s, 0.0)
    r = _ratio(cut, base)
    ok = cut is not None and _clean(cut)
    detail = ""
    if cut is not None:
        detail = f"{s}: cancelled {cut.cancelled}, errors {cut.errors}, violations {cut.violations}"
        others = [c for o in ("lock", "queue", "semaphore") if (c := find(wl, w, o, rate))]
        bad = [
            f"{c.strategy} viol {c.violations} inval {c.connections_invalidated} "
            f"leak {c.connections_leaked}"
            for c in others
        ]
        if bad:
            detail += "; " + "; ".join(bad)
    return TargetResult(
        f"{s} @{w} with cancel rate {rate} >= {CANCEL_KEEPS}x without, invariants intact",
        db,
        wl,
        r,
        CANCEL_KEEPS,
        _status(r, CANCEL_KEEPS, ok),
        detail,
    )


def _memory(memory: MemoryResult | None) -> TargetResult:
    if memory is None:
        return TargetResult(
            f"memory <= {MEMORY_TARGET_BYTES} B per queued write",
            "-",
            "-",
            None,
            MEMORY_TARGET_BYTES,
            "N/A",
            "not measured (--memory)",
        )
    b = memory.tracemalloc_bytes_per_write
    return TargetResult(
        f"memory <= {MEMORY_TARGET_BYTES} B per queued write (tracemalloc)",
        "-",
        "-",
        b,
        MEMORY_TARGET_BYTES,
        "PASS" if b <= MEMORY_TARGET_BYTES else "MISS",
        f"{memory.queued} queued; RSS growth {memory.rss_bytes_per_write:.0f} B/write",
    )
