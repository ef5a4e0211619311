"""Bad input gets a clear error naming the value and the fix; a password never shows."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from writeturn import (
    ConfigurationError,
    DatabaseUnreachable,
    SerializerClosed,
    SerializerNotStarted,
    TurnTimeout,
    UnsupportedDatabase,
    WriteSerializer,
    WriteturnError,
)

from ._db import create_tables, record, serializer, sqlite_threads_alive

SECRET = "pw_s3cret"


async def noop(session: Any) -> None:
    return None


def sync_fn(session: Any) -> None:
    return None


FROM_URL_CASES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    (f"mysql://u:{SECRET}@h/db", {}, UnsupportedDatabase, "postgresql+asyncpg://"),
    (f"postgresql+psycopg2://u:{SECRET}@h/db", {}, UnsupportedDatabase, "writeturn supports"),
    ("sqlite://", {}, UnsupportedDatabase, "names no file"),
    ("sqlite:///:memory:", {}, UnsupportedDatabase, "names no file"),
    ("not a url at all", {}, UnsupportedDatabase, "cannot parse"),
    (
        f"postgresql://u:{SECRET}@h/db",
        {"sqlite_synchronous": "FULL"},
        ConfigurationError,
        "SQLite only",
    ),
    ("sqlite:///x.db", {"sqlite_synchronous": "FAST"}, ConfigurationError, "NORMAL"),
    ("sqlite:///x.db", {"coordination": "global"}, ConfigurationError, "'advisory'"),
    ("sqlite:///x.db", {"namespace": ""}, ConfigurationError, "namespace=''"),
    ("sqlite:///x.db", {"cancel_grace": -1}, ConfigurationError, "cancel_grace=-1"),
    ("sqlite:///x.db", {"sqlite_busy_timeout": float("nan")}, ConfigurationError, "busy"),
    # URL parameters that used to pass here and fail at start() as "unreachable".
    (f"postgresql://u:{SECRET}@h/db?connect_timeout=nan", {}, ConfigurationError, "'nan'"),
    (f"postgresql://u:{SECRET}@h/db?foo=bar", {}, ConfigurationError, "'foo'"),
    (f"postgresql://u:{SECRET}@h/db?requirepeer=pg", {}, ConfigurationError, "requirepeer"),
    (f"postgresql://u:{SECRET}@h/db?dbname=other", {}, ConfigurationError, "dbname='other'"),
    (f"postgresql://u:{SECRET}@h/db?sslnegotiation=x", {}, ConfigurationError, "direct"),
]


@pytest.mark.parametrize(("url", "options", "error", "fragment"), FROM_URL_CASES)
def test_from_url_rejects(
    url: str, options: dict[str, Any], error: type[Exception], fragment: str, tmp_path: Any
) -> None:
    url = url.replace("sqlite:///x.db", f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(error) as info:
        WriteSerializer.from_url(url, **options)
    assert fragment in str(info.value)
    assert SECRET not in str(info.value)
    assert isinstance(info.value, WriteturnError) and isinstance(info.value, ValueError)


def test_a_sync_engine_is_refused() -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(ConfigurationError, match=r"AsyncEngine.*create_async_engine"):
        WriteSerializer(engine)  # type: ignore[arg-type]


SUBMIT_CASES: list[tuple[dict[str, Any], str]] = [
    ({"key": 42}, "key must be a non-empty string or None, got 42"),
    ({"key": ""}, "key must be a non-empty string"),
    ({"writer": ["a"]}, "writer must be a string"),
    ({"timeout": 0}, "timeout=0"),
    ({"timeout": -1.5}, "timeout=-1.5"),
    ({"timeout": float("inf")}, "finite"),
    ({"timeout": True}, "timeout=True"),
    ({"timeout": "2"}, "timeout='2'"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), SUBMIT_CASES)
async def test_submit_rejects(sqlite_url: str, kwargs: dict[str, Any], fragment: str) -> None:
    async with serializer(sqlite_url) as ser:
        with pytest.raises(ConfigurationError) as info:
            ser.submit(noop, **kwargs)
        assert fragment in str(info.value)
        with pytest.raises(ConfigurationError):
            ser.transaction(**kwargs)
        # Nothing was queued or lost by the refused call.
        assert not any(dataclasses.astuple(ser.stats()))


async def test_write_functions_must_be_async(sqlite_url: str) -> None:
    async with serializer(sqlite_url) as ser:
        with pytest.raises(ConfigurationError, match="async function"):
            ser.submit("not callable")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="sync_fn' is a plain function"):
            ser.submit(sync_fn)  # type: ignore[arg-type]
        assert not any(dataclasses.astuple(ser.stats()))  # refused before it was queued


async def test_calls_in_the_wrong_state(sqlite_url: str) -> None:
    ser = WriteSerializer.from_url(sqlite_url)
    with pytest.raises(SerializerNotStarted, match="async with serializer"):
        ser.submit(noop)
    async with ser:
        handle = ser.submit(noop)
        with pytest.raises(asyncio.InvalidStateError, match="not done"):
            handle.result()
        await handle
        ctx = ser.transaction()
        async with ctx:
            pass
        with pytest.raises(ConfigurationError, match="already entered"):
            async with ctx:
                pass
        with pytest.raises(ConfigurationError, match="timeout=-1"):
            await ser.close(timeout=-1)
    with pytest.raises(SerializerClosed, match="accepts no new writes"):
        ser.submit(noop)
    with pytest.raises(SerializerClosed, match="create a new one"):
        await ser.start()


async def test_unreachable_database_says_so_without_the_password() -> None:
    ser = WriteSerializer.from_url(
        f"postgresql://app:{SECRET}@127.0.0.1:1/nowhere", connect_args={"timeout": 2}
    )
    assert SECRET not in repr(ser)
    with pytest.raises(DatabaseUnreachable) as info:
        await ser.start()
    assert "cannot reach postgresql+asyncpg://app:***@127.0.0.1:1/nowhere" in str(info.value)
    assert SECRET not in str(info.value)
    await ser.close()


def test_error_classes_are_what_they_say() -> None:
    assert issubclass(TurnTimeout, TimeoutError) and issubclass(TurnTimeout, WriteturnError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(UnsupportedDatabase, ConfigurationError)
    assert str(SerializerNotStarted()).startswith("The serializer is not started")


@pytest.mark.postgres
async def test_no_password_in_repr_or_logs(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # Trust auth ignores the password; it is here to be hidden.
    url = make_url(pg_url).set(password=SECRET).render_as_string(hide_password=False)
    assert SECRET in url
    caplog.set_level(logging.DEBUG, logger="writeturn")
    async with serializer(url) as ser:
        await create_tables(ser.engine)
        assert SECRET not in repr(ser)
        await ser.run(record, "k", "w", 1, key="k")
        assert SECRET not in repr(ser.submit(noop))
    assert SECRET not in caplog.text


async def test_a_full_queue_refuses_at_once_and_loses_nothing(sqlite_url: str) -> None:
    from writeturn import QueueFull

    async with serializer(sqlite_url, max_queue=3) as ser:
        started, release = asyncio.Event(), asyncio.Event()

        async def hold(session: Any) -> None:
            started.set()
            await release.wait()

        holder = ser.submit(hold, key="k")
        await started.wait()
        queued = [ser.submit(noop, key="k") for _ in range(3)]
        with pytest.raises(QueueFull, match="3 writes already wait for key 'k'"):
            ser.submit(noop, key="k")
        ser.submit(noop, key="other")  # other keys have queues of their own
        assert ser.stats().queued == 3
        release.set()
        await asyncio.gather(holder, *queued)
        assert all(h.outcome.value == "committed" for h in queued)
    with pytest.raises(ConfigurationError, match="max_queue=0"):
        WriteSerializer.from_url(sqlite_url, max_queue=0)


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("text file", "file is not a database"),
        ("missing directory", "unable to open database file"),
    ],
)
async def test_a_misconfigured_sqlite_file_is_named(
    tmp_path: Any, setup: str, fragment: str
) -> None:
    if setup == "text file":
        path = tmp_path / "notes.db"
        path.write_text("not a database")
    else:
        path = tmp_path / "no" / "such" / "dir" / "app.db"
    ser = WriteSerializer.from_url(f"sqlite:///{path}")
    with pytest.raises(DatabaseUnreachable) as info:
        await ser.start()
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert "directory exists and is writable" in str(info.value)
    await ser.close()


async def test_a_failed_sqlite_connect_leaves_no_thread_running(tmp_path: Any) -> None:
    # aiosqlite raises before the failed connection's thread has stopped; that
    # thread then reports to an event loop that may be closed by then, and dies
    # with "Event loop is closed". writeturn waits for it before raising.
    from writeturn.migrations import upgrade_async

    before = sqlite_threads_alive()
    for attempt in range(20):
        url = f"sqlite:///{tmp_path / f'missing{attempt}' / 'app.db'}"
        ser = WriteSerializer.from_url(url)
        with pytest.raises(DatabaseUnreachable):
            await ser.start()
        await ser.close()
        with pytest.raises(WriteturnError):
            await upgrade_async(url)
        alive = sorted(sqlite_threads_alive() - before)
        assert not alive, f"attempt {attempt}: a failed connect left {alive} running"


@pytest.mark.postgres
@pytest.mark.parametrize(
    "query",
    ["connect_timeout=0", "connect_timeout=-1", "dbname={db}", "sslnegotiation=postgres"],
)
async def test_libpq_url_parameters_connect_as_libpq_would(pg_url: str, query: str) -> None:
    url = make_url(pg_url)
    base = url.set(database="") if "dbname" in query else url  # dbname alone names it
    given = f"{base.render_as_string(hide_password=False)}?{query.format(db=url.database)}"
    async with WriteSerializer.from_url(given) as ser:
        await create_tables(ser.engine)
        await ser.run(record, "k", "w", 1, key="k")
        async with ser.engine.connect() as conn:
            name = await conn.exec_driver_sql("SELECT current_database()")
            assert name.scalar_one() == url.database
