"""A connection owned by a write: only writeturn ends its transaction.

While a write's transaction is open, its connection is marked owned. Engine
listeners then refuse, with :class:`TransactionOwnedError`, what would end
or split the transaction behind writeturn's back: ``commit()`` or
``rollback()`` on the connection (``(await session.connection()).commit()``)
and transaction-control SQL (``text("COMMIT")``, ``BEGIN``, ...). Savepoints
stay allowed. They also note a statement that failed, because on Postgres
such a failure aborts the whole transaction even when the function caught
the error, and COMMIT then rolls back without a word (see :func:`failed`).

The listeners are installed once per engine and do nothing on connections
that no write owns, so they are harmless on an engine the application also
uses directly.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .errors import TransactionOwnedError

__all__ = ["install", "own", "disown", "ending", "failed"]

# While a write's transaction is open: the owning Connection object itself, so
# that a mark left on a pooled connection by a write whose connection died
# means nothing to the next checkout (a new Connection object).
_OWNED = "writeturn_owned"
_ENDING = "writeturn_ending"  # True while writeturn itself commits or rolls back
_FAILED = "writeturn_failed"  # the first statement error of the transaction

# Statements that end, start or prepare a transaction; SAVEPOINT, RELEASE and
# ROLLBACK TO are allowed (begin_nested() sends them).
_CONTROL = re.compile(
    r"\s*(COMMIT|END|ABORT|BEGIN|START\s+TRANSACTION|PREPARE\s+TRANSACTION|"
    r"ROLLBACK(?!\s+(WORK\s+|TRANSACTION\s+)?TO\b))\b",
    re.IGNORECASE,
)


def install(engine: AsyncEngine) -> None:
    """Add the listeners to ``engine`` (once, however many serializers share it)."""
    sync = engine.sync_engine
    if event.contains(sync, "commit", _on_commit):
        return
    event.listen(sync, "commit", _on_commit)
    event.listen(sync, "rollback", _on_rollback)
    event.listen(sync, "before_cursor_execute", _on_execute)
    event.listen(sync, "handle_error", _on_error)


def own(conn: AsyncConnection) -> None:
    info = conn.info
    info[_OWNED] = conn.sync_connection
    info.pop(_FAILED, None)
    info.pop(_ENDING, None)


def disown(conn: AsyncConnection) -> None:
    if conn.invalidated or conn.closed:
        return  # reading .info would reconnect; the mark is stale from now on anyway
    info = conn.info
    info.pop(_OWNED, None)
    info.pop(_ENDING, None)
    info.pop(_FAILED, None)


def ending(conn: AsyncConnection) -> None:
    """writeturn is about to commit or roll back ``conn``'s transaction itself."""
    conn.info[_ENDING] = True


def failed(conn: AsyncConnection) -> BaseException | None:
    """The first statement error seen in the owned transaction, if any."""
    if conn.invalidated or conn.closed:
        return None
    value = conn.info.get(_FAILED)
    return value if isinstance(value, BaseException) else None


def _owned(conn: Connection) -> bool:
    if conn.invalidated or conn.closed:
        return False
    info = conn.info
    return info.get(_OWNED) is conn and not info.get(_ENDING)


def _on_commit(conn: Connection) -> None:
    if _owned(conn):
        raise TransactionOwnedError(
            "commit() on the connection of a writeturn write: writeturn commits when your "
            "function returns (or the `async with` block exits cleanly); remove the commit() "
            "call, or use `await session.flush()` to send pending changes now"
        )


def _on_rollback(conn: Connection) -> None:
    if _owned(conn):
        raise TransactionOwnedError(
            "rollback() on the connection of a writeturn write: raise an exception from your "
            "function (or the `async with` block) to roll the write back; use "
            "`session.begin_nested()` for a savepoint you can roll back on its own"
        )


def _on_execute(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    if _owned(conn) and _CONTROL.match(statement):
        word = statement.split(None, 1)[0].upper()
        raise TransactionOwnedError(
            f"{word} sent inside a writeturn write: writeturn owns the transaction (it "
            "commits when your function returns and rolls back when it raises); remove the "
            "statement, or use `session.begin_nested()` for a savepoint"
        )


def _on_error(ctx: Any) -> None:
    conn = ctx.connection
    if conn is not None and not ctx.is_disconnect and _owned(conn):
        conn.info.setdefault(_FAILED, ctx.original_exception)
