"""A small service for the graceful-shutdown test: writes steadily until SIGTERM, then
closes its serializer with close(drain=True, timeout=CLOSE_TIMEOUT) and exits 0.

Usage: python _shutdown_worker.py URL CLOSE_TIMEOUT

The database must already have the test tables (ledger, and a counter row per key, see
_db.create_tables) for the keys k0 .. k{KEYS - 1}. WRITERS tasks each keep DEPTH writes
in flight; write number ``i`` (ids are unique and given out in submission order from 0)
inserts one ledger row with seq = i, pauses, then increments its key's counter, so a
half-applied write would show as a counter that differs from its row count.

Prints JSON lines on stdout, each flushed at once:
- {"event": "ready"} once READY_AFTER writes have committed (the SIGTERM handler is in place);
- {"id": i, "key": k, "outcome": o, "error": name or null} for each write, printed only
  after its handle has settled (o is the handle's outcome);
- {"event": "sigterm", "submitted": n, "pending": [ids]} when SIGTERM arrives: how many
  writes were submitted, and the ids not settled at that moment. No write is submitted
  after this line;
- {"event": "closed", "took": s, "unsettled": [ids], "stats_committed": n} once close()
  has returned (unsettled: writes close() left unsettled, checked before any writer
  resumes), then {"event": "summary", "submitted": n, "committed": n}.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
from collections import deque
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome, WriteHandle, WriteSerializer

KEYS = 2
WRITERS = 8
DEPTH = 4  # writes each writer keeps in flight: a queue that close() must drain
PAUSE = 0.02  # seconds between a write's two statements
READY_AFTER = 10
SAFETY_LIMIT = 60.0  # seconds: stop on our own if no SIGTERM ever comes


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def write(session: AsyncSession, key: str, writer: str, wid: int) -> None:
    """One ledger row and one counter increment, in one transaction."""
    await session.execute(
        text("INSERT INTO ledger (key, writer, seq) VALUES (:k, :w, :s)"),
        {"k": key, "w": writer, "s": wid},
    )
    await asyncio.sleep(PAUSE)
    n = (
        await session.execute(text("SELECT n FROM counter WHERE key = :k"), {"k": key})
    ).scalar_one()
    await session.execute(text("UPDATE counter SET n = :n WHERE key = :k"), {"n": n + 1, "k": key})


async def main(url: str, close_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    ser = WriteSerializer.from_url(url, coordination="advisory")
    await ser.start()
    stopping = asyncio.Event()
    ready = asyncio.Event()
    ids = itertools.count()
    handles: dict[int, WriteHandle[None]] = {}
    committed = 0

    def on_sigterm() -> None:
        if stopping.is_set():
            return
        stopping.set()  # runs between tasks: no writer submits after this line
        pending = sorted(i for i, h in handles.items() if not h.done())
        say(event="sigterm", submitted=len(handles), pending=pending)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    async def settle(wid: int, key: str, h: WriteHandle[None]) -> None:
        nonlocal committed
        error: str | None = None
        try:
            await h
        except Exception as exc:
            error = type(exc).__name__
        say(id=wid, key=key, outcome=h.outcome.value, error=error)
        if h.outcome is Outcome.COMMITTED:
            committed += 1
            if committed >= READY_AFTER and not ready.is_set():
                ready.set()
                say(event="ready")

    async def writer(n: int) -> None:
        key, name = f"k{n % KEYS}", f"w{n}"
        inflight: deque[tuple[int, WriteHandle[None]]] = deque()
        while True:
            while not stopping.is_set() and len(inflight) < DEPTH:
                wid = next(ids)
                h = ser.submit(write, key, name, wid, key=key, writer=name)
                handles[wid] = h
                inflight.append((wid, h))
            if not inflight:
                return
            wid, h = inflight.popleft()
            await settle(wid, key, h)

    writers = [asyncio.create_task(writer(n)) for n in range(WRITERS)]
    try:
        await asyncio.wait_for(stopping.wait(), SAFETY_LIMIT)
    except TimeoutError:
        say(event="no-sigterm")
        on_sigterm()
    began = time.monotonic()
    await ser.close(drain=True, timeout=close_timeout)
    took = time.monotonic() - began
    # Checked before any writer runs again: close() has settled every write by itself.
    unsettled = sorted(i for i, h in handles.items() if not h.done())
    say(
        event="closed",
        took=round(took, 3),
        unsettled=unsettled,
        stats_committed=ser.stats().committed,
    )
    await asyncio.gather(*writers)
    say(event="summary", submitted=len(handles), committed=committed)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
