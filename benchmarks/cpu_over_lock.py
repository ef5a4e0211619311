"""The CPU writeturn adds to a write, over the same write under an ``asyncio.Lock``.

One process writes the same one-row insert three ways, one write at a time:
inside ``async with lock:`` around a session transaction (the fix writeturn
replaces), through ``coordination="turn"`` and through ``"advisory"``. The
three alternate in rounds; each round's CPU time per write (every thread of
this process, aiosqlite's too, not the database server's) is taken, and the
medians over the rounds are printed with each mode's excess over the lock.

    python benchmarks/cpu_over_lock.py                      # a temporary SQLite file
    python benchmarks/cpu_over_lock.py --url postgresql+asyncpg://postgres@127.0.0.1:5432/bench

To compare two versions, run it alternately with ``PYTHONPATH=<tree>/src`` for
each tree, on a machine doing nothing else, and compare the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from writeturn import WriteSerializer

TABLE = "writeturn_cpu_over_lock"


async def insert(session: AsyncSession, i: int) -> None:
    await session.execute(text(f"INSERT INTO {TABLE} (v) VALUES (:v)"), {"v": i})


async def alternate(
    modes: dict[str, Callable[[int], Awaitable[Any]]], rounds: int, writes: int, *, warm_up: int
) -> dict[str, float]:
    """Each mode's median CPU time per write, in microseconds, over ``rounds`` rounds of
    ``writes`` writes per mode, the modes taking turns within each round (after
    ``warm_up`` writes of each: connections, statement caches)."""
    for i in range(warm_up):
        for write in modes.values():
            await write(i)
    per_write: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, write in modes.items():
            began = time.process_time()
            for i in range(writes):
                await write(i)
            per_write[name].append((time.process_time() - began) / writes * 1e6)
    return {name: statistics.median(values) for name, values in per_write.items()}


async def main(url: str, rounds: int, writes: int) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        await conn.execute(text(f"CREATE TABLE {TABLE} (v INTEGER)"))
    lock = asyncio.Lock()
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def locked(i: int) -> None:
        async with lock, sessions() as session, session.begin():
            await insert(session, i)

    modes: dict[str, Callable[[int], Awaitable[Any]]] = {"lock": locked}
    serializers = []
    for coordination in ("turn", "advisory"):
        ser = WriteSerializer(engine, coordination=coordination)
        await ser.start()
        serializers.append(ser)
        modes[coordination] = lambda i, ser=ser: ser.submit(insert, i, key="k", writer="w")
    try:
        median = await alternate(modes, rounds, writes, warm_up=100)
    finally:
        for ser in serializers:
            await ser.close()
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        await engine.dispose()
    over = {name: us - median["lock"] for name, us in median.items() if name != "lock"}
    print(
        f"{engine.dialect.name}: CPU per write (median of {rounds} rounds of {writes}): "
        + ", ".join(f"{name} {us:.0f} us" for name, us in median.items())
        + "; over the lock: "
        + ", ".join(f"{name} {us:+.0f} us" for name, us in over.items())
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--writes", type=int, default=300, help="writes per mode per round")
    args = parser.parse_args()
    url = args.url or f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/cpu.db"
    asyncio.run(main(url, args.rounds, args.writes))
