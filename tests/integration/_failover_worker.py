"""A service process for the failover storms: several writers on a few keys, each write
journaled with an idempotency key of its own and retried, until a stop file appears.

Usage: python _failover_worker.py URL PROCESS WRITERS KEYS SEED STOP_FILE OUT_FILE
Writes one JSON line per write to OUT_FILE: its idempotency key, key, outcome, seq,
the error's class (and whether it is writeturn's own), and when it ended (time.time()).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import WriteSerializer, WriteturnError


async def write(session: AsyncSession, key: str, idem: str) -> None:
    await session.execute(
        text("INSERT INTO ledger (key, idem, xid) VALUES (:k, :i, txid_current())"),
        {"k": key, "i": idem},
    )


async def main(url: str, process: int, writers: int, keys: int, seed: int, stop: str) -> list[Any]:
    rnd = random.Random(seed * 1000 + process)
    done: list[dict[str, Any]] = []
    async with WriteSerializer.from_url(url, journal=True, retry_backoff=0.05) as ser:
        with open(f"{stop}.ready-{process}", "w"):  # noqa: ASYNC230 - once, at start
            pass  # started: the test switches over once every process has

        async def writer(w: int) -> None:
            i = 0
            while not os.path.exists(stop):  # noqa: ASYNC240 - a stat between writes
                idem = f"p{process}-w{w}-{i}"
                key = f"k{rnd.randrange(keys)}"
                i += 1
                began = time.time()
                handle = ser.submit(write, key, idem, key=key, idempotency_key=idem, retries=6)
                error: BaseException | None = None
                try:
                    await handle
                except BaseException as exc:  # every error is recorded, raw ones too
                    error = exc
                done.append(
                    {
                        "idem": idem,
                        "key": key,
                        "outcome": handle.outcome.value if handle.outcome else None,
                        "seq": handle.seq,
                        "error": None if error is None else type(error).__name__,
                        "ours": error is None or isinstance(error, WriteturnError),
                        "message": None if error is None else str(error)[:300],
                        "t0": began,
                        "t": time.time(),
                    }
                )
                await asyncio.sleep(rnd.uniform(0, 0.01))

        await asyncio.gather(*(writer(w) for w in range(writers)))
    return done


if __name__ == "__main__":
    url, process, writers, keys, seed, stop, out = sys.argv[1:8]
    result = asyncio.run(main(url, int(process), int(writers), int(keys), int(seed), stop))
    with open(out, "w") as f:
        for line in result:
            f.write(json.dumps(line) + "\n")
