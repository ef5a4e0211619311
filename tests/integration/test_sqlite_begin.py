"""SQLite's BEGIN IMMEDIATE costs no round trip to the connection's thread when the
write lock is free, and never blocks the event loop when it is not.

Every statement through aiosqlite is a round trip to the thread the
connection lives on. A write's BEGIN IMMEDIATE goes straight to SQLite from
the event loop's thread, with the busy timeout at zero for it: it takes the
lock at once, or fails at once and then waits on the connection's thread with
the configured timeout. SQLite's own trace callback says which thread ran each
BEGIN; the writes' rows and the busy timeout each write sees are checked too.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from writeturn import Outcome, WriteSerializer

from ._db import create_tables, ledger, record, serializer
from .test_sqlite_busy import busy_timeout_ms, hold_write_lock

BUSY_TIMEOUT = 7.0  # seconds; not the default, so a timeout left at zero is seen


class Traces:
    """(statement, thread name) for every statement SQLite runs on the engine's connections."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def install(self, engine: Any) -> None:
        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Set on the connection's own thread: a memory database's refuses any other.
            dbapi_connection.run_async(
                lambda aio: aio._execute(aio._conn.set_trace_callback, self._trace)
            )

    def _trace(self, statement: str) -> None:
        self.seen.append((statement.strip(), threading.current_thread().name))

    def begins(self) -> list[str]:
        return [thread for statement, thread in self.seen if statement == "BEGIN IMMEDIATE"]


async def _write(session: AsyncSession, key: str, writer: str, seq: int) -> int:
    await record(session, key, writer, seq)
    return await busy_timeout_ms(session)


async def test_a_free_write_lock_is_taken_from_the_event_loop_thread(tmp_path: Path) -> None:
    traces = Traces()
    async with serializer(
        f"sqlite:///{tmp_path / 'b.db'}", sqlite_busy_timeout=BUSY_TIMEOUT
    ) as ser:
        await create_tables(ser.engine)
        traces.install(ser.engine)
        await ser.engine.dispose()  # the next connections are traced from their start
        seen = [await ser.run(_write, "k", "w", n, key="k") for n in range(20)]
        rows = await ledger(ser.engine)
    assert seen == [int(BUSY_TIMEOUT * 1000)] * 20
    assert traces.begins() == [threading.main_thread().name] * 20, traces.begins()
    assert [(r[1], r[2], r[3]) for r in rows] == [("k", "w", n) for n in range(20)]


async def test_a_held_write_lock_is_waited_for_on_the_connection_thread(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    traces = Traces()
    async with serializer(f"sqlite:///{path}", sqlite_busy_timeout=BUSY_TIMEOUT) as ser:
        await create_tables(ser.engine)
        traces.install(ser.engine)
        await ser.engine.dispose()
        holder = await hold_write_lock(path, 0.5)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        try:
            handle = ser.submit(_write, "k", "w", 0, key="k")
            # While the other process holds the lock, the write waits and the loop runs.
            await asyncio.sleep(0.2)
            assert not handle.done()
            assert ticks >= 5, ticks
            assert await asyncio.wait_for(handle, 30) == int(BUSY_TIMEOUT * 1000)
            assert handle.outcome is Outcome.COMMITTED
        finally:
            ticking.cancel()
            await holder.wait()
        # Then a free lock again: straight from the loop's thread, with the timeout restored.
        assert await ser.run(_write, "k", "w", 1, key="k") == int(BUSY_TIMEOUT * 1000)
        rows = await ledger(ser.engine)
    main = threading.main_thread().name
    begins = traces.begins()
    assert begins[0] == main, begins  # tried at once, refused at once
    assert begins[1] != main, begins  # waited for on the connection's own thread
    assert begins[2:] == [main], begins
    assert [(r[2], r[3]) for r in rows] == [("w", 0), ("w", 1)]


async def test_a_memory_database_begins_on_its_own_thread() -> None:
    # SQLAlchemy opens a memory database with check_same_thread: its sqlite3
    # connection refuses any other thread, so every BEGIN goes to its own.
    traces = Traces()
    engine = create_async_engine("sqlite+aiosqlite://")
    traces.install(engine)
    try:
        async with WriteSerializer(engine) as ser:
            await create_tables(engine)
            for n in range(3):
                await ser.run(_write, "k", "w", n, key="k")
            rows = await ledger(engine)
    finally:
        await engine.dispose()
    begins = traces.begins()
    assert len(begins) == 3 and threading.main_thread().name not in begins, begins
    assert [(r[2], r[3]) for r in rows] == [("w", n) for n in range(3)]
