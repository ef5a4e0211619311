"""SerializerLifespan in-process, as a test client drives an app: started, shut down,
started again; and what it refuses."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

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
