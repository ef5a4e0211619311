"""A Starlette service that writes through writeturn: copy it as a starting point.

    pip install 'writeturn[asgi]'
    DATABASE_URL=sqlite:///app.db uvicorn asgi_service:app     # or postgresql://user@host/db

    curl -X POST localhost:8000/accounts/1/deposit -d '{"amount": 10}'
    curl localhost:8000/accounts/1

What each piece does:
- SerializerLifespan starts the serializer before the first request and, on shutdown
  (SIGTERM), waits for the requests still running, then drains the serializer, each
  step bounded.
- WriteturnMiddleware cancels a request's handler when its client disconnects, so the
  write it awaits is withdrawn or rolled back instead of finishing for nobody; it also
  tells the lifespan which requests are still running.
- Each endpoint awaits its write and answers from the outcome: a 200 means COMMITTED.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from writeturn import TurnTimeout, WriteSerializer
from writeturn.asgi import SerializerLifespan, WriteturnMiddleware

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///app.db")

writes = SerializerLifespan(
    lambda: WriteSerializer.from_url(DATABASE_URL),
    handler_timeout=10.0,  # at shutdown: how long running requests may take to finish
    drain_timeout=10.0,  # then: how long queued writes may take to commit
)


async def deposit(session: AsyncSession, account: int, amount: int) -> int:
    """Runs in the account's turn, inside one transaction: read, then write."""
    balance = (
        await session.execute(text("SELECT balance FROM accounts WHERE id = :id"), {"id": account})
    ).scalar()
    if balance is None:
        await session.execute(
            text("INSERT INTO accounts (id, balance) VALUES (:id, :b)"),
            {"id": account, "b": amount},
        )
        return amount
    await session.execute(
        text("UPDATE accounts SET balance = :b WHERE id = :id"),
        {"b": balance + amount, "id": account},
    )
    return int(balance) + amount


async def post_deposit(request: Request) -> JSONResponse:
    account = int(request.path_params["account"])
    body = await request.json()
    amount = body.get("amount") if isinstance(body, dict) else None
    if not isinstance(amount, int) or isinstance(amount, bool):
        return JSONResponse({"error": f"amount must be a whole number, got {amount!r}"}, 400)
    try:
        balance = await writes.serializer().run(
            deposit, account, amount, key=f"account:{account}", timeout=5.0
        )
    except TurnTimeout:
        return JSONResponse({"error": "busy, try again"}, 503)
    return JSONResponse({"account": account, "balance": balance})


async def get_account(request: Request) -> JSONResponse:
    account = int(request.path_params["account"])
    # Reads go to the engine directly: they need no turn.
    async with writes.serializer().engine.connect() as conn:
        balance = (
            await conn.execute(text("SELECT balance FROM accounts WHERE id = :id"), {"id": account})
        ).scalar()
    return JSONResponse({"account": account, "balance": balance or 0})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with writes(app):
        # A real service creates its tables with its own migrations; this keeps the
        # example self-contained.
        async with writes.serializer().engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS accounts "
                    "(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)"
                )
            )
        yield


app = Starlette(
    routes=[
        Route("/accounts/{account:int}", get_account, methods=["GET"]),
        Route("/accounts/{account:int}/deposit", post_deposit, methods=["POST"]),
    ],
    middleware=[Middleware(WriteturnMiddleware, lifespan=writes)],
    lifespan=lifespan,
)
