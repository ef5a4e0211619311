"""What a driver error means to writeturn, per database: the one place that decides it.

Every part of writeturn that acts on a database error (a transaction deciding
whether COMMIT landed or whether a write may run again, the journal finding
its table missing, a migration's lock wait timing out, the pooler check at
start) asks :func:`classify` instead of reading SQLSTATEs, message texts or
``connection_invalidated`` itself.

An error can be of more than one kind at once: asyncpg refuses a statement on
a connection it already knows is closed before sending anything (``NOT_SENT``),
and SQLAlchemy invalidates that connection (``LOST``). So :class:`ErrorKind` is
a flag, and callers ask ``ErrorKind.LOST in kind``.

One kind is also told to SQLAlchemy: :func:`install` makes it take an error
of a server that no longer takes writes (``UNWRITABLE``) for a disconnect, so
that such a connection is discarded wherever the error is met.

Only the rules for SQLite (aiosqlite) and Postgres (asyncpg) are here; the
only kind another database gets is ``LOST``, which SQLAlchemy itself decides
(and, on Postgres, ``UNWRITABLE`` once installed).
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from .schema import VERSION_TABLE, metadata

__all__ = ["ErrorKind", "classify", "install"]


class ErrorKind(enum.Flag):
    """What writeturn acts on in a driver error; see :func:`classify`."""

    #: The connection died: SQLAlchemy invalidated it (the server ended the
    #: session, the socket closed, the driver found it closed).
    LOST = enum.auto()
    #: The driver refused the call before anything of it reached the server
    #: (Postgres: asyncpg on a closed connection, or one busy with another call).
    NOT_SENT = enum.auto()
    #: Worth running again: a serialization failure or a deadlock (Postgres),
    #: the write lock held past the busy timeout (SQLite).
    TRANSIENT = enum.auto()
    #: The transaction is aborted: a statement failed in it, and the database
    #: ignores every other one until ROLLBACK (Postgres).
    ABORTED = enum.auto()
    #: Prepared statements of different clients met on one server connection:
    #: a transaction-mode pooler (PgBouncer) in front of asyncpg's statement cache.
    STATEMENT_CLASH = enum.auto()
    #: A table the statement names does not exist: writeturn's schema was not
    #: migrated (on SQLite, the message names one of writeturn's own tables).
    MISSING_TABLE = enum.auto()
    #: A lock wait ran out its ``lock_timeout`` (Postgres).
    LOCK_TIMEOUT = enum.auto()
    #: The server takes no writes: a standby (in recovery), a primary fenced
    #: read-only or demoted, one shutting down (Postgres). A connection to it
    #: is lost for writes: see :func:`install`.
    UNWRITABLE = enum.auto()
    #: None of the above.
    OTHER = enum.auto()


def classify(dialect: str, exc: BaseException) -> ErrorKind:
    """What ``exc`` means on the database ``dialect`` names (``engine.dialect.name``).

    ``exc`` is what SQLAlchemy raised (a ``DBAPIError``, the driver's error
    in its ``orig``), or anything else a database call raised; only
    ``NOT_SENT`` is read from errors that are not a ``DBAPIError``. The
    result holds one kind or more (``LOST`` with another), never ``OTHER``
    with another.
    """
    kind = ErrorKind(0)
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        kind |= ErrorKind.LOST
    if dialect == "postgresql":
        kind |= _postgres(exc)
    elif dialect == "sqlite":
        kind |= _sqlite(exc)
    return kind or ErrorKind.OTHER


def install(engine: AsyncEngine) -> None:
    """Make SQLAlchemy treat an error of ``engine`` that says the server takes no
    writes (:attr:`ErrorKind.UNWRITABLE`) as a disconnect: the connection is
    invalidated, with every pooled connection made before it, as for a dropped
    socket. A failover's old primary, fenced read-only, keeps its connections
    open and answers every write with an error: its connections would
    otherwise go back to the pool and fail every later write until the pool
    turned over. A fresh connection reaches the new primary where the URL names
    every host with ``target_session_attrs=read-write``. Installed once per engine.
    """
    sync = engine.sync_engine
    if not event.contains(sync, "handle_error", _on_error):
        event.listen(sync, "handle_error", _on_error)


def _on_error(ctx: Any) -> None:
    exc = ctx.sqlalchemy_exception
    if not ctx.is_disconnect and exc is not None and ctx.dialect is not None:
        if ErrorKind.UNWRITABLE in classify(ctx.dialect.name, exc):
            ctx.is_disconnect = True


# -- Postgres (asyncpg) ------------------------------------------------------------------

#: asyncpg refuses a call with these before it writes anything to the socket.
_NOT_SENT = ("connection is closed", "another operation is in progress")

#: SQLSTATE -> kind. serialization_failure, deadlock_detected; in_failed_sql_transaction;
#: duplicate_prepared_statement, invalid_sql_statement_name (what asyncpg's named
#: statements meet behind a transaction-mode pooler); undefined_table; lock_not_available.
_STATES = {
    "40001": ErrorKind.TRANSIENT,
    "40P01": ErrorKind.TRANSIENT,
    "25P02": ErrorKind.ABORTED,
    "42P05": ErrorKind.STATEMENT_CLASH,
    "26000": ErrorKind.STATEMENT_CLASH,
    "42P01": ErrorKind.MISSING_TABLE,
    "55P03": ErrorKind.LOCK_TIMEOUT,
    # read_only_sql_transaction (a standby, default_transaction_read_only fencing);
    # admin_shutdown, crash_shutdown, cannot_connect_now (shutting down, or in recovery).
    "25006": ErrorKind.UNWRITABLE,
    "57P01": ErrorKind.UNWRITABLE,
    "57P02": ErrorKind.UNWRITABLE,
    "57P03": ErrorKind.UNWRITABLE,
}

#: What a server in recovery says of functions that need a primary (the WAL
#: position, assigning a transaction id), whatever their SQLSTATE.
_IN_RECOVERY = ("recovery is in progress", "during recovery")


def _postgres(exc: BaseException) -> ErrorKind:
    kind = ErrorKind(0)
    text = str(exc.orig if isinstance(exc, DBAPIError) else exc).lower()
    if any(marker in text for marker in _NOT_SENT):
        kind |= ErrorKind.NOT_SENT
    if isinstance(exc, DBAPIError):
        kind |= _STATES.get(_sqlstate(exc) or "", ErrorKind(0))
        if any(marker in text for marker in _IN_RECOVERY):
            kind |= ErrorKind.UNWRITABLE
    return kind


def _sqlstate(exc: DBAPIError) -> str | None:
    """The SQLSTATE SQLAlchemy's adapter copied from the driver's error, if any."""
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


# -- SQLite (aiosqlite) ------------------------------------------------------------------

#: Another connection held the write lock past the busy timeout (SQLITE_BUSY,
#: SQLITE_LOCKED); matched in the lowered message.
_BUSY = ("database is locked", "database table is locked")

#: What SQLite says of a missing table of writeturn's, exactly as it says it.
_MISSING = tuple(f"no such table: {name}" for name in (*metadata.tables, VERSION_TABLE))


def _sqlite(exc: BaseException) -> ErrorKind:
    if not isinstance(exc, DBAPIError):
        return ErrorKind(0)
    kind = ErrorKind(0)
    text = str(exc.orig)
    lowered = text.lower()
    if any(marker in lowered for marker in _BUSY):
        kind |= ErrorKind.TRANSIENT
    if any(marker in text for marker in _MISSING):
        kind |= ErrorKind.MISSING_TABLE
    return kind
