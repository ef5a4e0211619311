"""The memory a queued write holds: many writes queued behind one held turn.

Two passes over the same scenario: one under ``tracemalloc`` (the Python
memory the queued writes hold, precise), one without it (the growth of the
process's resident set, honest about allocator overhead but coarse: pages).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
import tracemalloc
from typing import Any

from ...handle import WriteHandle
from ...serializer import WriteSerializer
from ._model import MemoryResult
from ._strategies import Database

__all__ = ["measure_memory"]

KEY = "writeturn-bench-memory"


async def measure_memory(db: Database, queued: int) -> MemoryResult:
    """Queue ``queued`` writes on one key behind a write holding its turn; measure; withdraw."""
    rss = await _one_pass(db, queued, traced=False)
    traced = await _one_pass(db, queued, traced=True)
    return MemoryResult(
        queued=queued,
        tracemalloc_bytes_per_write=traced[0] / queued,
        tracemalloc_peak_bytes_per_write=traced[1] / queued,
        rss_bytes_per_write=rss[0] / queued,
        submit_seconds=rss[2],
    )


async def _noop(session: Any) -> None:
    return None


async def _one_pass(db: Database, queued: int, *, traced: bool) -> tuple[float, float, float]:
    """(bytes held, peak bytes, seconds to submit) for ``queued`` writes."""
    ser = WriteSerializer.from_url(db.url, coordination="turn", sqlite_synchronous=db.synchronous)
    await ser.start()
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold(session: Any) -> None:
        held.set()
        await release.wait()

    holder = ser.submit(hold, key=KEY)
    handles: list[WriteHandle[None] | None] = [None] * queued  # not counted: the caller's
    try:
        await held.wait()
        held_bytes, peak, seconds = _submit_all(ser, handles, traced)
    finally:
        await ser.close(drain=False)  # withdraws the queued writes, rolls the holder back
    del holder, handles
    return held_bytes, peak, seconds


def _submit_all(
    ser: WriteSerializer, handles: list[WriteHandle[None] | None], traced: bool
) -> tuple[float, float, float]:
    gc.collect()
    if traced:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    else:
        base = _rss()
    t0 = time.perf_counter()
    for i in range(len(handles)):
        handles[i] = ser.submit(_noop, key=KEY)
    seconds = time.perf_counter() - t0
    if not traced:
        grown = float(_rss() - base)
        return grown, grown, seconds
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return float(current - base), float(peak - base), seconds


def _rss() -> int:
    """The resident set size now, in bytes (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
