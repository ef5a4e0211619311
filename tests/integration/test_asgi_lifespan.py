"""SerializerLifespan in-process, as a test client drives an app: started, shut down,
started again; and what it refuses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from writeturn import (
    ConfigurationError,
    Outcome,
    SerializerClosed,
    SerializerNotStarted,
    WriteSerializer,
)
from writeturn.asgi import SerializerLifespan, WriteturnMiddleware


async def nothing(session: AsyncSession) -> int:
    return 1


async def test_a_factory_lifespan_starts_a_new_serializer_each_run(sqlite_url: str) -> None:
    writes = SerializerLifespan(lambda: WriteSerializer.from_url(sqlite_url))
    with pytest.raises(SerializerNotStarted, match="lifespan="):
        writes.serializer()
    seen = []
    for _ in range(2):
        async with writes(None):
            ser = writes.serializer()
            handle = ser.submit(nothing, key="k")
            assert await handle == 1 and handle.outcome is Outcome.COMMITTED
            seen.append(ser)
        with pytest.raises(SerializerClosed, match="shut down"):
            writes.serializer()
    assert seen[0] is not seen[1]


async def test_an_instance_lifespan_runs_once(sqlite_url: str) -> None:
    writes = SerializerLifespan(WriteSerializer.from_url(sqlite_url))
    async with writes(None):
        assert await writes.serializer().run(nothing, key="k") == 1
    with pytest.raises(SerializerClosed, match="give it a function"):
        async with writes(None):
            pass


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SerializerLifespan("sqlite:///x.db"), "function returning one"),
        (lambda: SerializerLifespan(lambda: None, drain_timeout=0), "drain_timeout=0"),
        (lambda: WriteturnMiddleware(None, timeout=-1), "timeout=-1"),
        (lambda: WriteturnMiddleware(None, lifespan=object()), "SerializerLifespan"),
    ],
)
def test_bad_arguments_are_named_with_the_fix(make: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make()


async def test_a_factory_that_returns_something_else_fails_the_startup() -> None:
    writes = SerializerLifespan(lambda: "sqlite:///x.db")
    with pytest.raises(ConfigurationError, match="returned str"):
        await writes.startup()


async def _serve_one_request_through_shutdown(writes: SerializerLifespan) -> list[str]:
    """One app run on the current event loop, as a test client drives it: start up, begin a
    request whose write is running, ask for shutdown meanwhile, and see it through.

    Returns the lifespan messages the app sent; the request's write must have committed."""

    async def slow_insert(session: AsyncSession, running: asyncio.Event) -> None:
        running.set()
        await asyncio.sleep(0.2)  # still running when the shutdown begins
        await session.execute(text("INSERT INTO t (n) VALUES (1)"))

    running = asyncio.Event()

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        await writes.serializer().run(slow_insert, running, key="k")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = writes.wrap(handler)
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(app({"type": "lifespan"}, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    sent = [(await from_app.get())["type"]]
    if sent != ["lifespan.startup.complete"]:
        return sent
    async with writes.serializer().engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS t (n INTEGER)"))

    responses: list[dict[str, Any]] = []

    async def nothing_more() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def respond(message: dict[str, Any]) -> None:
        responses.append(message)

    request = asyncio.create_task(
        app({"type": "http", "method": "POST", "path": "/"}, nothing_more, respond)
    )
    await running.wait()
    await to_app.put({"type": "lifespan.shutdown"})
    sent.append((await from_app.get())["type"])
    await lifespan
    await request
    assert [m["type"] for m in responses] == ["http.response.start", "http.response.body"]
    return sent


async def _rows(url: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT count(*) FROM t"))).scalar_one())
    finally:
        await engine.dispose()


def test_a_lifespan_started_again_on_a_new_event_loop_drains_and_closes(db_url: str) -> None:
    # A test client per test starts the app on an event loop of its own each time.
    made: list[WriteSerializer] = []

    def factory() -> WriteSerializer:
        made.append(WriteSerializer.from_url(db_url))
        return made[-1]

    writes = SerializerLifespan(factory)
    for run in (1, 2):
        sent = asyncio.run(_serve_one_request_through_shutdown(writes))
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"], (run, sent)
        assert " closed " in repr(made[-1]), (run, made[-1])
        assert asyncio.run(_rows(db_url)) == run
    assert len(made) == 2
