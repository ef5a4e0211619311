"""A writer process for the SQLite turn tests: queue every write at once, on one key.

Usage: python _turns_worker.py URL COORDINATION WRITERS WRITES_PER_WRITER BARRIER_FILE
Creates BARRIER_FILE.ready.<pid> once connected, then starts when BARRIER_FILE exists.
Each write inserts one row into ``turns`` (pid, writer, its number, the time it ran).
Prints one JSON line: {"pid": ..., "submitted": <time all writes were queued>, "committed": n}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import WriteSerializer

TURNS_DDL = (
    "CREATE TABLE turns (id {serial}, pid INTEGER NOT NULL, "
    "writer TEXT NOT NULL, n INTEGER NOT NULL, t DOUBLE PRECISION NOT NULL)"
)


def turns_ddl(url: str) -> str:
    """The ``turns`` table: its id is the commit order (assigned under the key's lock)."""
    sqlite = url.startswith("sqlite")
    return TURNS_DDL.format(
        serial="INTEGER PRIMARY KEY AUTOINCREMENT" if sqlite else "BIGSERIAL PRIMARY KEY"
    )


async def insert(session: AsyncSession, writer: str, n: int) -> None:
    await session.execute(
        text("INSERT INTO turns (pid, writer, n, t) VALUES (:p, :w, :n, :t)"),
        {"p": os.getpid(), "w": writer, "n": n, "t": time.time()},
    )


def ready_then_wait(barrier: str, limit: float = 60.0) -> None:
    """Say this process is ready, then wait until the test creates ``barrier``."""
    with open(f"{barrier}.ready.{os.getpid()}", "w"):
        pass
    deadline = time.monotonic() + limit
    while not os.path.exists(barrier) and time.monotonic() < deadline:
        time.sleep(0.002)


async def main(url: str, coordination: str, writers: int, writes: int, barrier: str) -> None:
    ser = WriteSerializer.from_url(url, coordination=coordination)  # type: ignore[arg-type]
    async with ser:
        await ser.run(insert, "warm-up", -1)  # connect and open the queue before the start
        await asyncio.to_thread(ready_then_wait, barrier)
        names = [f"{os.getpid()}-{i}" for i in range(writers)]
        handles = [
            ser.submit(insert, name, n, key="k", writer=name)
            for name in names
            for n in range(writes)
        ]
        submitted = time.time()
        await asyncio.gather(*handles)
    print(json.dumps({"pid": os.getpid(), "submitted": submitted, "committed": len(handles)}))


if __name__ == "__main__":
    url, coordination, writers, writes, barrier = sys.argv[1:6]
    asyncio.run(main(url, coordination, int(writers), int(writes), barrier))
