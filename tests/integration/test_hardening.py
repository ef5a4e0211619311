"""Bad input that used to fail late now fails at once: at build or submit, before it runs.

Each test here failed before its check existed: the write went into the
database and failed there with a raw driver error, ran a function it should
have refused, or deadlocked until a timeout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import (
    ConfigurationError,
    WriteSerializer,
    migrations,
)
from writeturn._options import MAX_KEY, MAX_NAMESPACE, MAX_WRITER

from ._db import counter, create_tables, serializer


async def bump(session: AsyncSession, key: str = "k") -> str:
    await session.execute(text("UPDATE counter SET n = n + 1 WHERE key = :k"), {"k": key})
    return "bumped"


async def migrated(url: str, *keys: str) -> None:
    await migrations.upgrade_async(url)
    async with serializer(url) as ser:
        await create_tables(ser.engine, *(keys or ("k",)))


async def journal_rows(ser: WriteSerializer) -> list[tuple[Any, ...]]:
    async with ser.engine.connect() as conn:
        sql = "SELECT key, seq, idempotency_key FROM writeturn_journal ORDER BY key, seq"
        return [tuple(r) for r in await conn.execute(text(sql))]


def nothing_queued(ser: WriteSerializer) -> bool:
    return not any(dataclasses.astuple(ser.stats()))


# -- 1. the journal's limits, and NUL --------------------------------------------------


JOURNAL_CASES: list[tuple[dict[str, Any], str]] = [
    ({"key": "k" * (MAX_KEY + 1)}, f"over the limit of {MAX_KEY}"),
    ({"key": "k", "writer": "w" * (MAX_WRITER + 1)}, f"over the limit of {MAX_WRITER}"),
    ({"key": "k\x00"}, "NUL"),
    ({"key": "k", "writer": "w\x00"}, "NUL"),
    ({"key": "k", "idempotency_key": "req\x00"}, "NUL"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), JOURNAL_CASES)
async def test_what_the_journal_cannot_store_is_refused_at_submit(
    db_url: str, kwargs: dict[str, Any], fragment: str
) -> None:
    await migrated(db_url)
    async with serializer(db_url, journal=True) as ser:
        with pytest.raises(ConfigurationError, match=fragment):
            ser.submit(bump, **kwargs)
        if "idempotency_key" not in kwargs:  # transaction() takes none
            with pytest.raises(ConfigurationError, match=fragment):
                ser.transaction(**kwargs)
        assert nothing_queued(ser)
        # The refused writes left nothing behind: the next one is seq 1.
        handle = ser.submit(bump, key="k")
        assert await handle == "bumped" and handle.seq == 1
        assert await counter(ser.engine) == 1


async def test_the_limits_hold_without_the_journal_too(db_url: str) -> None:
    # So that turning the journal on never starts refusing keys used all along.
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        with pytest.raises(ConfigurationError, match=f"over the limit of {MAX_KEY}"):
            ser.submit(bump, key="k" * (MAX_KEY + 1))
        with pytest.raises(ConfigurationError, match="NUL"):
            ser.submit(bump, key="k", writer="\x00")
        assert nothing_queued(ser)
        await ser.run(bump, key="k", writer="w" * MAX_WRITER)  # the limit itself is fine
        assert await counter(ser.engine) == 1


async def test_a_namespace_the_journal_cannot_store_is_refused_when_built(db_url: str) -> None:
    cases = (("n" * (MAX_NAMESPACE + 1), "over the limit of"), ("a\x00b", "NUL"))
    for namespace, fragment in cases:
        with pytest.raises(ConfigurationError, match=fragment):
            WriteSerializer.from_url(db_url, journal=True, namespace=namespace)


async def test_a_megabyte_key_is_not_repeated_in_the_error(db_url: str) -> None:
    async with serializer(db_url) as ser:
        for kwargs in ({"key": "k" * 1_000_000}, {"idempotency_key": "i" * 501}):
            with pytest.raises(ConfigurationError) as info:
                ser.submit(bump, **kwargs)
            assert len(str(info.value)) < 500 and "characters)" in str(info.value)
