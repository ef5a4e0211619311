"""A failed SQLite connect ends its worker thread before it raises.

aiosqlite runs each connection on a thread of its own. When opening the file
fails (a missing directory, no permission), aiosqlite queues the thread's stop
and raises at once, without waiting for the stop. The thread then reports back
to the event loop a moment later, and if that loop has closed meanwhile (a
CLI run, a test, a service shutting down after the error) the thread dies
with ``RuntimeError: Event loop is closed`` printed on stderr.

Engines writeturn creates open their connections through :func:`_connect`,
which waits (briefly: the thread has only its stop left to do) for the thread
to end before the error propagates. Engines a user lends to writeturn are
left as they are.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiosqlite
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["join_failed_connects"]

# Longest wait for the thread of a failed connect; it normally ends in microseconds.
_THREAD_END_WAIT = 2.0


def join_failed_connects(engine: AsyncEngine) -> None:
    """Make every connect of the SQLite ``engine`` end its thread when it fails."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _do_connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        # SQLAlchemy's aiosqlite adapter calls ``async_creator_fn(*cargs, **cparams)``
        # in place of ``aiosqlite.connect`` and awaits what it returns.
        cparams.setdefault("async_creator_fn", _connect)


def _connect(*args: Any, **kwargs: Any) -> Any:
    conn = aiosqlite.connect(*args, **kwargs)
    # aiosqlite >= 0.22 holds its thread; before that the connection was the thread.
    thread: Any = getattr(conn, "_thread", conn)
    thread.daemon = True  # as SQLAlchemy sets it: a hung file never blocks exit
    return _opened(conn, thread)


async def _opened(conn: aiosqlite.Connection, thread: Any) -> aiosqlite.Connection:
    try:
        return await conn
    except BaseException:
        if thread.is_alive():
            await asyncio.to_thread(thread.join, _THREAD_END_WAIT)
        raise
