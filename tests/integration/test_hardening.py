"""Bad input that used to fail late now fails at once: at build or submit, before it runs.

Each test here failed before its check existed: the write went into the
database and failed there with a raw driver error, ran a function it should
have refused, or deadlocked until a timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import NullPool

from writeturn import (
    ConfigurationError,
    IdempotencyKeyReused,
    Outcome,
    ReentrantWriteError,
    UnsupportedDatabase,
    WriteSerializer,
    migrations,
)
from writeturn._options import MAX_KEY, MAX_NAMESPACE, MAX_WRITER

from ._db import counter, create_tables, ledger, record, serializer

SECRET = "pw_s3cret"


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


# -- 2. SQLite's busy timeout, batch bounds, engine options ----------------------------


async def test_the_largest_busy_timeout_sqlite_holds_is_the_limit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    with pytest.raises(ConfigurationError, match="32-bit count of milliseconds"):
        WriteSerializer.from_url(url, sqlite_busy_timeout=3e6)
    async with serializer(url, sqlite_busy_timeout=2_147_483.647) as ser:
        async with ser.engine.connect() as conn:
            busy = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
            await conn.rollback()
    assert busy == 2**31 - 1  # SQLite kept it whole: one millisecond more would wrap


@pytest.mark.parametrize(
    ("options", "fragment"),
    [({"batch_max": 10**9}, "from 1 to 10000"), ({"batch_window": 1e9}, "at most 1.0 seconds")],
)
def test_batches_too_large_to_help_are_refused(
    tmp_path: Path, options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        WriteSerializer.from_url(f"sqlite:///{tmp_path / 'app.db'}", **options)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"pool_size": "x"}, "pool_size='x'"),
        ({"echo": "loud"}, "echo='loud'"),
        ({"pool_sise": 5}, "pool_sise=5"),
        ({"execution_options": "x"}, "execution_options='x'"),
        ({"poolclass": NullPool, "pool_size": 3}, "pool_size=3"),
        ({"pool_size": 2, "connect_args": "password=x"}, "connect_args='password=x'"),
    ],
)
@pytest.mark.parametrize("scheme", ["sqlite", "postgresql"])
def test_a_bad_engine_option_is_named_without_the_password(
    tmp_path: Path, scheme: str, options: dict[str, Any], named: str
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'app.db'}"
        if scheme == "sqlite"
        else f"postgresql://app:{SECRET}@127.0.0.1:1/db"
    )
    with pytest.raises(ConfigurationError) as info:
        WriteSerializer.from_url(url, **options)
    message = str(info.value)
    assert named in message and "create_engine() documentation" in message
    assert SECRET not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_password_in_connect_args_is_masked(tmp_path: Path) -> None:
    # A bad option's error must not echo a password passed beside it.
    with pytest.raises(ConfigurationError) as info:
        WriteSerializer.from_url(
            "postgresql://app@127.0.0.1:1/db",
            connect_args={"password": SECRET},
            execution_options=f"password={SECRET}",
        )
    assert "execution_options=" in str(info.value) and SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (f"postgresql://app:{SECRET}@127.0.0.1:1/db?prepared_statement_cache_size=x", "'x'"),
        (f"postgresql://app:{SECRET}@127.0.0.1/db?port=x", "port"),
        ("sqlite:///{tmp}/app.db?timeout=x", "'x'"),
    ],
)
def test_a_url_sqlalchemy_refuses_is_blamed_not_the_engine_options(
    tmp_path: Path, url: str, named: str
) -> None:
    # The URL alone is refused: blaming connect_args (which the URL's mapping adds,
    # unasked) or pool_size would send the reader to the wrong place.
    with pytest.raises(UnsupportedDatabase) as info:
        WriteSerializer.from_url(url.format(tmp=tmp_path), pool_size=2)
    message = str(info.value)
    assert "database URL" in message and named in message and SECRET not in message
    assert "engine option" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


# -- 3. a plain def is refused before it runs ------------------------------------------


RAN: list[str] = []


def plain(session: Any) -> None:
    RAN.append("plain")


async def agen(session: Any) -> Any:
    RAN.append("agen")
    yield None


class SyncCall:
    def __call__(self, session: Any) -> None:
        RAN.append("SyncCall")

    def method(self, session: Any) -> None:
        RAN.append("method")


class AsyncCall:
    async def __call__(self, session: AsyncSession) -> str:
        return await bump(session)

    async def method(self, session: AsyncSession) -> str:
        return await bump(session)


def keeps_identity(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(session: Any) -> Any:
        return fn(session)

    return wrapper


class NotAwaitable:
    """Calling a class cannot be told apart from calling an async function without calling it."""

    def __init__(self, session: Any) -> None:
        RAN.append("NotAwaitable")


REFUSED = {
    "def": plain,
    "lambda": lambda session: RAN.append("lambda"),
    "partial of a def": functools.partial(plain),
    "partial of a partial": functools.partial(functools.partial(plain)),
    "object with a sync __call__": SyncCall(),
    "sync method": SyncCall().method,
    "partial of a sync object": functools.partial(SyncCall()),
    "async generator": agen,
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_a_plain_function_is_refused_before_it_runs(sqlite_url: str, name: str) -> None:
    RAN.clear()
    async with serializer(sqlite_url) as ser:
        with pytest.raises(ConfigurationError, match=r"not an `async def`.*nothing was queued"):
            ser.submit(REFUSED[name])
        with pytest.raises(ConfigurationError, match="not an `async def`"):
            await ser.run(REFUSED[name])
        assert nothing_queued(ser)
    assert RAN == []


ACCEPTED = {
    "async def": bump,
    "partial of an async def": functools.partial(bump, key="k"),
    "object with an async __call__": AsyncCall(),
    "async method": AsyncCall().method,
    "partial of an async object": functools.partial(AsyncCall()),
    "wrapped with functools.wraps": keeps_identity(bump),
}


async def test_async_callables_of_every_shape_run(sqlite_url: str) -> None:
    async with serializer(sqlite_url) as ser:
        await create_tables(ser.engine)
        for fn in ACCEPTED.values():
            assert await ser.run(fn) == "bumped"
        assert await counter(ser.engine) == len(ACCEPTED)


async def test_what_cannot_be_told_is_still_checked_when_it_runs(sqlite_url: str) -> None:
    RAN.clear()
    async with serializer(sqlite_url) as ser:
        handle = ser.submit(NotAwaitable)
        with pytest.raises(ConfigurationError, match="returned NotAwaitable, not an awaitable"):
            await handle
        assert handle.outcome is Outcome.ROLLED_BACK
    assert RAN == ["NotAwaitable"]


# -- 5. an idempotency key reused on another key --------------------------------------


async def test_an_idempotency_key_reused_on_another_key_is_refused(db_url: str) -> None:
    await migrated(db_url, "a", "b")
    async with serializer(db_url) as ser:
        first = ser.submit(bump, "a", key="a", idempotency_key="req-1")
        assert await first == "bumped" and first.seq == 1
        other = ser.submit(bump, "b", key="b", idempotency_key="req-1")
        with pytest.raises(IdempotencyKeyReused) as info:
            await other
        message = str(info.value)
        assert "'req-1'" in message and "on key 'a'" in message and "on key 'b'" in message
        assert isinstance(info.value, ConfigurationError)
        # Its function did not run, its transaction rolled back, and it has no seq.
        assert other.outcome is Outcome.ROLLED_BACK
        assert other.seq is None and other.duplicate is False
        assert await counter(ser.engine, "b") == 0
        # The key's own writes go on: the next write on b is b's seq 1.
        nxt = ser.submit(bump, "b", key="b", idempotency_key="req-2")
        assert await nxt == "bumped" and nxt.seq == 1
        # On the key it was first used on, the idempotency key is still a duplicate.
        again = ser.submit(bump, "a", key="a", idempotency_key="req-1")
        assert await again is None and again.duplicate and again.seq == 1
        assert await journal_rows(ser) == [("a", 1, "req-1"), ("b", 1, "req-2")]
        assert await counter(ser.engine, "a") == 1


async def test_a_reused_idempotency_key_in_a_batch_fails_alone(db_url: str) -> None:
    await migrated(db_url, "a", "b")
    async with serializer(db_url, batch_max=8, batch_window=0.01) as ser:
        await ser.run(bump, "a", key="a", idempotency_key="req-1")
        started, release = asyncio.Event(), asyncio.Event()

        async def hold(session: AsyncSession) -> None:
            started.set()
            await release.wait()

        holder = ser.submit(hold, key="b")
        await started.wait()
        queued = [
            ser.submit(bump, "b", key="b", idempotency_key=ik) for ik in ("b-1", "req-1", "b-2")
        ]
        release.set()
        await holder
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert isinstance(results[1], IdempotencyKeyReused)
        assert [h.outcome for h in queued] == [
            Outcome.COMMITTED,
            Outcome.ROLLED_BACK,
            Outcome.COMMITTED,
        ]
        assert await counter(ser.engine, "b") == 2
        assert [r for r in await journal_rows(ser) if r[0] == "b"] == [
            ("b", 1, "b-1"),
            ("b", 2, "b-2"),
        ]


# -- 6. re-entrancy through a task started inside the turn ----------------------------


async def test_a_write_gathered_from_inside_its_own_turn_is_refused(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)

        async def outer(session: AsyncSession, spawn: str) -> None:
            await record(session, "k", "outer", 1)
            inner = ser.run(record, "k", "inner", 2, key="k")
            async with asyncio.timeout(5):  # before the check: a deadlock until here
                if spawn == "gather":
                    await asyncio.gather(inner)
                elif spawn == "task":
                    await asyncio.get_running_loop().create_task(inner)
                else:
                    await asyncio.wait_for(inner, 10)

        for spawn in ("gather", "task", "wait_for"):
            # wait_for runs its awaitable in a task of its own before Python 3.12, and
            # in the caller's task from 3.12 on: refused either way, as spawned or as
            # the same task.
            where = "spawned inside" if spawn != "wait_for" else "(spawned |started )inside"
            with pytest.raises(ReentrantWriteError, match=f"{where} .*turn on key 'k'"):
                await ser.run(outer, spawn, key="k")
        async with ser.transaction(key="k") as session:
            await record(session, "k", "block", 3)
            with pytest.raises(ReentrantWriteError):
                async with asyncio.timeout(5):
                    await asyncio.gather(ser.run(record, "k", "inner", 4, key="k"))
            if ser.engine.dialect.name == "sqlite":  # one writer: any key would wait
                with pytest.raises(ReentrantWriteError, match="single writer"):
                    async with asyncio.timeout(5):
                        await asyncio.gather(ser.run(record, "o", "other", 5, key="o"))
            else:  # Postgres: another key runs beside it
                await asyncio.gather(ser.run(record, "o", "other", 5, key="o"))
        assert ser.stats().committed == (1 if ser.engine.dialect.name == "sqlite" else 2)
        assert {r[3] for r in await ledger(ser.engine)} == (
            {3} if ser.engine.dialect.name == "sqlite" else {3, 5}
        )


async def test_a_task_started_inside_a_write_writes_once_the_write_ended(db_url: str) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        ended = asyncio.Event()
        later: list[asyncio.Task[Any]] = []

        async def after_the_turn(seq: int) -> None:
            await ended.wait()
            await ser.run(record, "k", "later", seq, key="k")

        async def spawns(session: AsyncSession) -> None:
            later.append(asyncio.get_running_loop().create_task(after_the_turn(1)))

        await ser.run(spawns, key="k")
        ended.set()
        await asyncio.wait_for(later[0], 10)
        # A transaction() block runs in the caller's task, which lives on after
        # the block: its turn counts only while the key's turn is taken.
        ended.clear()
        async with ser.transaction(key="k"):
            later.append(asyncio.get_running_loop().create_task(after_the_turn(2)))
        ended.set()
        await asyncio.wait_for(later[1], 10)
        assert sorted(r[3] for r in await ledger(ser.engine)) == [1, 2]


async def test_a_task_started_inside_a_block_may_close_once_the_block_ended(db_url: str) -> None:
    ser = WriteSerializer.from_url(db_url)
    async with ser:
        ended = asyncio.Event()

        async def close_later() -> None:
            await ended.wait()
            await ser.close()

        async with ser.transaction(key="k"):
            closer = asyncio.get_running_loop().create_task(close_later())
        ended.set()
        await asyncio.wait_for(closer, 10)
        assert repr(ser).count(" closed ") == 1


async def test_a_task_started_inside_a_write_is_refused_while_the_write_runs(
    db_url: str,
) -> None:
    # The documented limit: the write might await it (a deadlock), and a task
    # cannot tell whether it will, so it is refused even when it would not.
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
        refused: list[BaseException] = []

        async def background() -> None:
            try:
                ser.submit(record, "k", "background", 2, key="k")
            except ReentrantWriteError as exc:
                refused.append(exc)

        async def spawns(session: AsyncSession) -> None:
            task = asyncio.get_running_loop().create_task(background())
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert task.done()
            await record(session, "k", "outer", 1)

        await ser.run(spawns, key="k")
        assert len(refused) == 1
        assert [r[3] for r in await ledger(ser.engine)] == [1]
