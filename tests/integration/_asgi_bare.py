"""A bare ASGI app (no framework) for the ASGI tests: SerializerLifespan.wrap answers the
server's lifespan events, WriteturnMiddleware runs the handler.

WT_ASGI_URL names the database (with the test tables). POST / with a body whose stripped
text is a whole number N writes one ledger row (seq = N) on key k0 and answers
"N LENGTH", LENGTH being the number of body bytes the handler received; GET answers "up".
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import WriteSerializer
from writeturn.asgi import SerializerLifespan, WriteturnMiddleware

writes = SerializerLifespan(lambda: WriteSerializer.from_url(os.environ["WT_ASGI_URL"]))


async def add_row(session: AsyncSession, n: int) -> None:
    await session.execute(
        text("INSERT INTO ledger (key, writer, seq) VALUES ('k0', NULL, :n)"), {"n": n}
    )
    await session.execute(text("UPDATE counter SET n = n + 1 WHERE key = 'k0'"))


async def handler(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    if scope["method"] == "GET":  # the test's "is it up?"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"up"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    n = int(body.strip())
    await writes.serializer().run(add_row, n, key="k0")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": f"{n} {len(body)}".encode()})


app = writes.wrap(WriteturnMiddleware(handler, lifespan=writes))
