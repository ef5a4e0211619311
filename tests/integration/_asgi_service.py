"""The FastAPI service the ASGI tests run under a real server (uvicorn or hypercorn).

Configured by environment variables:
- WT_ASGI_URL: the database (it must have the test tables: ledger, and counter rows);
- WT_ASGI_REPORT: a file that gets one JSON line per write once its handle has
  settled ({"id", "key", "outcome", "error"}), {"running": id} when a write's
  function starts, and {"event": "closed", ...} after the lifespan has closed the
  serializer;
- WT_ASGI_TIMEOUT: the middleware's handler timeout in seconds.

POST /write?id=I&key=K&pause=P[&timeout=T] runs one write: it inserts the ledger
row (seq = I), sleeps P seconds, then increments K's counter, so a half-applied
write would show as a counter that differs from its row count. It answers 200
with the outcome, 504 if the write's own timeout expired, 503 if the serializer
was closed. With audit=1, a handler that is cancelled writes an audit record (id
AUDIT + I) before it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import SerializerClosed, TurnTimeout, WriteSerializer
from writeturn.asgi import SerializerLifespan, WriteturnMiddleware

REPORT = open(os.environ["WT_ASGI_REPORT"], "a", buffering=1)  # open for the process's life

AUDIT = 100_000

writes = SerializerLifespan(
    lambda: WriteSerializer.from_url(os.environ["WT_ASGI_URL"]),
    handler_timeout=10.0,
    drain_timeout=5.0,
)


def report(line: dict[str, Any]) -> None:
    REPORT.write(json.dumps(line) + "\n")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with writes(app):
        ser = writes.serializer()
        yield
    report({"event": "closed", "stats_committed": ser.stats().committed})


app = FastAPI(lifespan=lifespan)
app.add_middleware(
    WriteturnMiddleware, lifespan=writes, timeout=float(os.environ["WT_ASGI_TIMEOUT"])
)


async def write(session: AsyncSession, i: int, key: str, pause: float) -> None:
    report({"running": i})
    await session.execute(
        text("INSERT INTO ledger (key, writer, seq) VALUES (:k, :w, :s)"),
        {"k": key, "w": f"w{i % 4}", "s": i},
    )
    await asyncio.sleep(pause)
    await session.execute(text("UPDATE counter SET n = n + 1 WHERE key = :k"), {"k": key})


@app.get("/health")
async def health(ser: Annotated[WriteSerializer, Depends(writes.serializer)]) -> dict[str, str]:
    return {"queued": str(ser.stats().queued)}


async def reported_write(
    ser: WriteSerializer, i: int, key: str, pause: float, timeout: float | None
) -> str:
    handle = ser.submit(write, i, key, pause, key=key, writer=f"w{i % 4}", timeout=timeout)
    error: str | None = None
    try:
        await handle
    except BaseException as exc:
        error = type(exc).__name__
        raise
    finally:
        # Reported only once the handle has settled: awaiting it ends only then.
        report({"id": i, "key": key, "outcome": handle.outcome.value, "error": error})
    return handle.outcome.value


@app.post("/write")
async def post_write(
    ser: Annotated[WriteSerializer, Depends(writes.serializer)],
    id: int,
    key: str,
    pause: float = 0.0,
    timeout: float | None = None,
    audit: bool = False,
) -> JSONResponse:
    report({"handler": id})  # a request cancelled before this line has no write at all
    try:
        outcome = await reported_write(ser, id, key, pause, timeout)
    except asyncio.CancelledError:
        if audit:
            # A handler that still writes once cancelled (here: an audit record, id
            # AUDIT + id): the lifespan must wait for it before closing the serializer.
            await reported_write(ser, AUDIT + id, key, 0.0, None)
        raise
    return JSONResponse({"id": id, "outcome": outcome})


@app.exception_handler(TurnTimeout)
async def turn_timeout(request: Any, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "TurnTimeout"}, status_code=504)


@app.exception_handler(SerializerClosed)
async def closed(request: Any, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "SerializerClosed"}, status_code=503)
