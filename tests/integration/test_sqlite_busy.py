"""SQLite's busy timeout survives a write that timed out waiting for another process's lock.

A write with a timeout waits for another process's write lock no longer than its
deadline. The wait must not leave its connection with a shortened busy timeout:
the next write on that connection, which has no timeout, must wait out the other
process for as long as ``sqlite_busy_timeout`` says, not fail with "database is
locked" after a fraction of a second.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome, TurnTimeout

from ._db import counter, create_tables, increment, quietly, serializer

# Another process: take SQLite's write lock, say so, hold it, roll back.
HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
conn.close()
"""


async def hold_write_lock(path: Path, seconds: float) -> asyncio.subprocess.Process:
    """Start a process that holds the database's write lock for ``seconds``; return once held."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        str(path),
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        assert await proc.stdout.readline() == b"held\n"
    return proc


async def busy_timeout_ms(session: AsyncSession) -> int:
    return int((await session.execute(text("PRAGMA busy_timeout"))).scalar_one())


async def test_busy_timeout_survives_a_write_timed_out_behind_another_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.db"
    async with serializer(f"sqlite:///{path}", sqlite_busy_timeout=5.0) as ser:
        await create_tables(ser.engine)
        assert await ser.run(busy_timeout_ms) == 5000

        holder = await hold_write_lock(path, 0.5)
        began = time.monotonic()
        h = ser.submit(increment, key="k", timeout=0.2)
        async with asyncio.timeout(10):
            exc = await quietly(h)
        waited = time.monotonic() - began
        assert isinstance(exc, TurnTimeout), repr(exc)
        assert h.outcome is Outcome.ROLLED_BACK
        await asyncio.wait_for(holder.wait(), 10)
        assert holder.returncode == 0

        # The next writes' connections still wait as long as configured.
        for _ in range(3):
            assert await ser.run(busy_timeout_ms) == 5000

        holder = await hold_write_lock(path, 1.0)
        began = time.monotonic()
        async with asyncio.timeout(10):
            exc = await quietly(ser.run(increment, key="k"))
        took = time.monotonic() - began
        await asyncio.wait_for(holder.wait(), 10)
        print(f"\ntimed-out write ended after {waited:.2f}s; the next write took {took:.2f}s")
        assert exc == 1, repr(exc)  # committed once the other process let go
        assert took > 3 * 0.2  # it did wait for the other process
        assert await counter(ser.engine) == 1
