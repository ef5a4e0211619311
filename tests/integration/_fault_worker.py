"""A writer process for the fault tests: read-then-write increments on key "k", in advisory mode.

Usage: python _fault_worker.py URL ROLE TASKS WRITES GO_FILE INSIDE_FILE

ROLE "survivor": when GO_FILE exists, TASKS tasks each commit WRITES increments; then, when
INSIDE_FILE exists, WRITES more each. Prints one JSON line at the end:
{"committed": n, "failed": [error names]}.

ROLE "victim": when GO_FILE exists, commits WRITES increments, printing {"committed": n}
after each; then starts one more, creates INSIDE_FILE while its transaction holds the
lock, and sleeps until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import WriteSerializer


async def increment(session: AsyncSession) -> None:
    n = (await session.execute(text("SELECT n FROM counter WHERE key = 'k'"))).scalar_one()
    await asyncio.sleep(0.001)  # invite a lost update: another process may write meanwhile
    await session.execute(text("UPDATE counter SET n = :n WHERE key = 'k'"), {"n": n + 1})


async def hang(session: AsyncSession, inside: str) -> None:
    await increment(session)
    await asyncio.to_thread(Path(inside).touch)  # the test kills this process now
    await asyncio.sleep(120)


def wait_for_file(path: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def survivor(ser: WriteSerializer, tasks: int, writes: int, inside: str) -> None:
    committed = 0
    failed: list[str] = []

    async def task(i: int) -> None:
        nonlocal committed
        for _ in range(writes):
            try:
                await ser.run(increment, key="k", writer=f"{os.getpid()}-{i}")
            except Exception as exc:
                failed.append(type(exc).__name__)
            else:
                committed += 1

    await asyncio.gather(*(task(i) for i in range(tasks)))
    await asyncio.to_thread(wait_for_file, inside)
    await asyncio.gather(*(task(i) for i in range(tasks)))
    say(committed=committed, failed=failed)


async def victim(ser: WriteSerializer, writes: int, inside: str) -> None:
    for i in range(writes):
        await ser.run(increment, key="k", writer="victim")
        say(committed=i + 1)
    await ser.run(hang, inside, key="k", writer="victim")
    say(error="the hanging write returned")


async def main(url: str, role: str, tasks: int, writes: int, go: str, inside: str) -> None:
    async with WriteSerializer.from_url(url, coordination="advisory") as ser:
        await asyncio.to_thread(wait_for_file, go)
        if role == "victim":
            await victim(ser, writes, inside)
        else:
            await survivor(ser, tasks, writes, inside)


if __name__ == "__main__":
    url, role, tasks, writes, go, inside = sys.argv[1:7]
    asyncio.run(main(url, role, int(tasks), int(writes), go, inside))
