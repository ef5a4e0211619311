"""A writer process for the tests of SQLite's line: one serializer in advisory mode.

Usage:
  python _line_worker.py write URL WRITES BARRIER_FILE
      Connect, write once, create BARRIER_FILE.ready.<pid>, wait until BARRIER_FILE
      exists, then queue WRITES writes on one key at once. Prints one JSON line:
      {"pid": ..., "committed": n}.
  python _line_worker.py fork URL BARRIER_FILE
      Start the ``forker`` below and stay alive as the parent of its orphans
      (Linux: a child subreaper), so that its forked child outlives it whatever
      the machine's first process does with orphans. Ends after two minutes.
  python _line_worker.py forker URL BARRIER_FILE
      Connect and write once (which takes a place in the line), fork a child that
      only sleeps, print {"pid": ..., "child": ...}, wait until BARRIER_FILE exists,
      then write once more: the test holds SQLite's write lock by then, so that
      write waits with a ticket in line until the test kills this process.
  python _line_worker.py join DATABASE
      Take a ticket in the line of DATABASE, print it, and sleep (to be frozen).

Each write inserts one row into ``line`` (pid, its number).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import subprocess
import sys
import time
import warnings
from typing import NoReturn

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import WriteSerializer
from writeturn._sqlite_queue import TicketQueue

try:  # imported by the tests
    from ._turns_worker import ready_then_wait
except ImportError:  # run as a script: its folder is on the path
    from _turns_worker import ready_then_wait  # type: ignore[no-redef]

LINE_DDL = "CREATE TABLE line (id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, n INTEGER)"


async def insert(session: AsyncSession, n: int) -> None:
    await session.execute(
        text("INSERT INTO line (pid, n) VALUES (:p, :n)"), {"p": os.getpid(), "n": n}
    )


def adopt_orphans() -> None:
    """Become the parent of this process's descendants when their parent dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def linger() -> NoReturn:
    """A forked child that never writes (a worker pool's, a daemon's): it outlives its parent."""
    time.sleep(60)
    os._exit(0)


async def write(url: str, writes: int, barrier: str) -> None:
    ser = WriteSerializer.from_url(url, coordination="advisory", sqlite_busy_timeout=30.0)
    async with ser:
        await ser.run(insert, -1)  # connect and take a place in the line before the start
        await asyncio.to_thread(ready_then_wait, barrier)
        handles = [ser.submit(insert, n, key="k") for n in range(writes)]
        await asyncio.gather(*handles)
    print(json.dumps({"pid": os.getpid(), "committed": len(handles)}), flush=True)


async def fork(url: str, barrier: str) -> None:
    ser = WriteSerializer.from_url(url, coordination="advisory", sqlite_busy_timeout=60.0)
    async with ser:
        await ser.run(insert, -1)  # this process now owns a slot of the line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # forking with threads
            child = os.fork()
        if child == 0:
            linger()
        print(json.dumps({"pid": os.getpid(), "child": child}), flush=True)
        await asyncio.to_thread(ready_then_wait, barrier)
        await ser.run(insert, 0)  # waits for the test's lock, holding a ticket, until killed
        await asyncio.sleep(60)


if __name__ == "__main__":
    mode, url = sys.argv[1:3]
    if mode == "write":
        asyncio.run(write(url, int(sys.argv[3]), sys.argv[4]))
    elif mode == "fork":
        adopt_orphans()
        forker = subprocess.Popen([sys.executable, __file__, "forker", url, sys.argv[3]])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                os.waitpid(-1, os.WNOHANG)  # the forker, then its child, once killed
            except ChildProcessError:
                pass
            time.sleep(0.05)
        forker.kill()
    elif mode == "forker":
        asyncio.run(fork(url, sys.argv[3]))
    elif mode == "join":
        queue = TicketQueue(url)
        assert queue.join()
        print(queue.ticket, flush=True)
        time.sleep(60)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
