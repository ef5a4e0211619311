"""The connection lease: the one connection a transaction runs on, from the moment it is
taken (parked, or checked out of the pool) until it is handed back (parked, or closed).

It also tells whether that connection died during the transaction, and turns
the error of a write that lost it into :class:`~writeturn.errors.ConnectionLost`
(:meth:`Lease.explain`), since only the lease still knows the connection then.

A stop during the pool checkout never cuts the connect off (asyncpg cut off
while it negotiates SSL leaves a future whose error nobody retrieves): the
write leaves at once, and the connect finishes in the background, its
connection parked or closed. Every other call the lease makes (invalidating
a dead connection, releasing the key's lock, closing) goes through the
transaction's :class:`~writeturn._calls.Calls` and runs to the end.

# Invariants:
# - the lease holds at most one connection, and the funnel's ``conn`` is it;
# - connect() keeps the connection the lease holds unless it was invalidated, and
#   takes a new one only once the dialect found it alive; a dead one retires
#   every connection the pool made before it (after three dead ones in a row it
#   raises DatabaseUnreachable, holding none);
# - a connection handed back is disowned first, and has its key's lock released
#   (or is discarded) before it is parked; an invalidated one is counted, never
#   parked, and takes the parked ones with it;
# - a checkout a stop left behind is kept (``keep``) until its connection has
#   been parked or closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NoReturn

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import _owned
from ._calls import Calls
from ._connections import ConnectionCache, retire_generation
from ._error_kinds import ErrorKind, classify
from .dialects import Dialect
from .errors import ConnectionLost, DatabaseUnreachable, OutcomeUnknown, PoolExhausted
from .outcome import Outcome
from .stats import Counters
from .urls import describe_error, redact

__all__ = ["Lease"]

log = logging.getLogger("writeturn")


class Lease:
    """The connection ``conn`` of one transaction for the write(s) holding ``key``'s turn."""

    __slots__ = (
        "conn",
        "_calls",
        "_engine",
        "_dialect",
        "_connections",
        "_counters",
        "_keep",
        "_key",
    )

    def __init__(
        self,
        calls: Calls,
        engine: AsyncEngine,
        dialect: Dialect,
        connections: ConnectionCache,
        counters: Counters,
        keep: Callable[[asyncio.Task[None]], None],
        key: str,
    ) -> None:
        self._calls = calls
        self._engine = engine
        self._dialect = dialect
        self._connections = connections
        self._counters = counters
        self._keep = keep  # holds a background task until it ends (close() waits for it)
        self._key = key
        self.conn: AsyncConnection | None = None

    async def connect(self) -> None:
        """Take a parked connection, or check one out of the pool; never a dead one.

        A connection the server closed while it sat idle (a restart, an idle
        timeout, ``pg_terminate_backend``) is discarded here, before anything of
        the write ran, at no cost to the write. Nothing has begun, so a
        cancellation simply abandons the checkout. Raises
        :class:`DatabaseUnreachable` if the database cannot be reached, and
        :class:`PoolExhausted` if the pool gave no connection in ``pool_timeout``.
        """
        if self.conn is not None and not self.conn.invalidated:
            return
        if self.conn is not None:
            await self.hand_back()
        for _ in range(3):
            conn = self._connections.take() or await self._checkout()
            if self._dialect.alive(conn):
                self.conn = self._calls.conn = conn
                return
            log.info("writeturn: a connection had been closed by the server while idle")
            retire_generation(conn)
            self.conn = self._calls.conn = conn
            await self._calls.call(conn.invalidate(), interruptible=False)
            await self.hand_back()
        await self._checkout_failed(ConnectionError("three connections in a row were dead"))

    async def _checkout(self) -> AsyncConnection:
        calls, connections = self._calls, self._connections
        checkout = asyncio.ensure_future(AsyncConnection(self._engine).start())
        try:
            # A stop leaves at once but never cuts the connect off: asyncpg cut
            # off while it negotiates SSL (sslmode=prefer, the default) leaves a
            # future whose error nobody retrieves, and asyncio logs it. The
            # connect ends in the background, and its connection is parked or closed.
            await asyncio.shield(checkout)
        except asyncio.CancelledError:
            calls.stopped = True
            self._keep(asyncio.ensure_future(connections.receive(checkout)))
            raise
        except Exception:
            pass  # raised below, from the checkout itself
        exc = checkout.exception()
        if exc is not None:
            await self._checkout_failed(exc)
        if calls.stopped:
            self._keep(asyncio.ensure_future(connections.receive(checkout)))
            raise asyncio.CancelledError
        return checkout.result()

    async def _checkout_failed(self, exc: BaseException) -> NoReturn:
        engine = self._engine
        if isinstance(exc, sa_exc.TimeoutError):
            pool = engine.pool
            raise PoolExhausted(
                f"no connection of the engine's pool became free for the write on key "
                f"{self._key!r} ({pool.status()}); the write did not begin. Raise the pool's "
                "size (pool_size, max_overflow), give readers their own engine, or lower "
                "pool_timeout to fail sooner"
            ) from exc
        url = engine.url
        raise DatabaseUnreachable(
            f"cannot reach {redact(url)} for the write on key {self._key!r}: "
            f"{describe_error(exc, url)}; the write did not begin"
        ) from exc

    async def hand_back(self) -> None:
        """Give the connection up, if the lease holds one: park it for the next write,
        or close it (back to the pool); a dead one is discarded."""
        conn = self.conn
        if conn is None:
            return
        self.conn = self._calls.conn = None
        dialect, connections = self._dialect, self._connections
        _owned.disown(conn)
        if not conn.invalidated and dialect.holds_lock(conn):
            await self._release_lock(conn)
        if conn.invalidated:
            self._counters.connections_invalidated += 1
            connections.drop_all()
        elif connections.park(conn):
            return  # kept for the next write: no pool round trip
        try:
            await self._calls.call(conn.close(), interruptible=False)
        except Exception as exc:
            log.warning("writeturn: returning a connection failed (%r)", exc)

    async def _release_lock(self, conn: AsyncConnection) -> None:
        """Release the key's lock a snapshot-level BEGIN took; a connection that cannot
        be unlocked is discarded (its session, and so its lock, ends with it)."""
        try:
            await self._calls.call(self._dialect.release(conn), interruptible=False)
        except Exception as exc:
            log.warning(
                "writeturn: releasing a key's lock failed (%r); discarding the connection", exc
            )
            try:
                await self._calls.call(conn.invalidate(), interruptible=False)
            except Exception:
                pass

    # -- a lost connection ---------------------------------------------------------------

    def lost(self, error: BaseException | None) -> bool:
        """Whether the connection died (read before it is handed back)."""
        conn = self.conn
        if conn is not None and (conn.invalidated or not self._dialect.alive(conn)):
            return True
        return error is not None and ErrorKind.LOST in classify(self._dialect.name, error)

    def explain(self, outcome: Outcome, error: BaseException | None) -> BaseException | None:
        """The error a write ends with: a lost connection becomes :class:`ConnectionLost`."""
        if (
            error is None
            or isinstance(error, asyncio.CancelledError | OutcomeUnknown)
            or not self.lost(error)
        ):
            return error
        cause = describe_error(error, self._engine.url)
        if ErrorKind.UNWRITABLE in classify(self._dialect.name, error):
            err = ConnectionLost(
                f"the server no longer takes writes (a standby, or a primary fenced "
                f"read-only, demoted or shutting down), so the connection of the write on key "
                f"{self._key!r} was discarded; outcome {outcome.value}: {cause}. Name every "
                "host in the URL with target_session_attrs=read-write, so that a new "
                "connection finds the primary, and give writes retries= to run them again there"
            )
        else:
            err = ConnectionLost(
                f"the connection to the database was lost during the write on key "
                f"{self._key!r}; outcome {outcome.value}: {cause}"
            )
        err.__cause__ = error
        return err
