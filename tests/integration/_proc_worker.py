"""A writer process for the cross-process tests: read-then-write increments on one key.

Usage: python _proc_worker.py URL COORDINATION TASKS WRITES_PER_TASK BARRIER_FILE [pgbouncer]
Prints one JSON line: {"committed": n}.
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


async def increment(session: AsyncSession) -> None:
    n = (await session.execute(text("SELECT n FROM counter WHERE key = 'k'"))).scalar_one()
    await asyncio.sleep(0.001)  # invite a lost update: another process may write meanwhile
    await session.execute(text("UPDATE counter SET n = :n WHERE key = 'k'"), {"n": n + 1})


def wait_for_file(path: str, limit: float = 30.0) -> None:
    """Start writing together with the other processes: when the test creates ``path``."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


async def main(
    url: str, coordination: str, tasks: int, writes: int, barrier: str, pgbouncer: bool = False
) -> None:
    ser = WriteSerializer.from_url(
        url,
        coordination=coordination,  # type: ignore[arg-type]
        pgbouncer=pgbouncer,
    )
    committed = 0
    async with ser:
        await asyncio.to_thread(wait_for_file, barrier)

        async def task(i: int) -> None:
            nonlocal committed
            for _ in range(writes):
                await ser.run(increment, key="k", writer=f"{os.getpid()}-{i}")
                committed += 1

        await asyncio.gather(*(task(i) for i in range(tasks)))
    print(json.dumps({"committed": committed}))


if __name__ == "__main__":
    url, coordination, tasks, writes, barrier = sys.argv[1:6]
    pgbouncer = sys.argv[6:7] == ["pgbouncer"]
    asyncio.run(main(url, coordination, int(tasks), int(writes), barrier, pgbouncer))
