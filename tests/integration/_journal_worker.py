"""A writer process for the journal tests.

Usage: python _journal_worker.py URL MODE COUNT BARRIER_FILE
MODE "idem": submit COUNT writes that all carry the idempotency key "req-1";
MODE "seq": COUNT journaled writes on key "k". Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import Outcome, WriteSerializer


async def apply(session: AsyncSession) -> None:
    await session.execute(text("UPDATE counter SET n = n + 1 WHERE key = 'k'"))


def wait_for_file(path: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


async def main(url: str, mode: str, count: int, barrier: str) -> None:
    async with WriteSerializer.from_url(url, journal=True) as ser:
        await asyncio.to_thread(wait_for_file, barrier)
        if mode == "idem":
            handles = [ser.submit(apply, key="k", idempotency_key="req-1") for _ in range(count)]
        else:
            handles = [ser.submit(apply, key="k", writer=str(os.getpid())) for _ in range(count)]
        await asyncio.gather(*handles)
        print(
            json.dumps(
                {
                    "committed": sum(h.outcome is Outcome.COMMITTED for h in handles),
                    "duplicates": sum(h.duplicate for h in handles),
                    "seqs": [h.seq for h in handles],
                }
            )
        )


if __name__ == "__main__":
    url, mode, count, barrier = sys.argv[1:5]
    asyncio.run(main(url, mode, int(count), barrier))
