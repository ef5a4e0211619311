"""Connections parked between writes, so the next write of any key skips the pool,
and never at the expense of anyone waiting for one.

# Invariants:
# - at most SPARES connections are parked, each idle and outside a transaction;
# - a connection is parked only while the pool could still hand out another
#   one at once (it has one idle, or room to open one): a parked connection is
#   never one that a reader or another write is waiting for;
# - a parked connection goes back to the pool MAX_IDLE seconds after it was
#   parked, by a timer, whether or not another write comes;
# - a connection being closed is tracked until its close finished (close()).
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import Pool, QueuePool

__all__ = ["ConnectionCache", "retire_generation"]

log = logging.getLogger("writeturn")

SPARES = 2
MAX_IDLE = 1.0


class ConnectionCache:
    """Up to two idle connections kept checked out between writes, for at most a second."""

    __slots__ = ("_engine", "_spares", "_closing", "open")

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # newest last, each with the timer that hands it back
        self._spares: list[tuple[AsyncConnection, asyncio.TimerHandle]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.open = True  # False once the serializer closes: nothing is parked then

    def __len__(self) -> int:
        return len(self._spares)

    def take(self) -> AsyncConnection | None:
        """A parked connection, or None."""
        while self._spares:
            conn, timer = self._spares.pop()
            timer.cancel()
            if not conn.invalidated and not conn.closed:
                return conn
            self._discard(conn)
        return None

    def can_serve_another(self) -> bool:
        """Whether another write could have a connection at once (a parked one, or
        the pool's), while the connections in use stay checked out."""
        return bool(self._spares) or _room_left(self._engine.pool)

    def park(self, conn: AsyncConnection) -> bool:
        """Keep ``conn`` for the next write instead of returning it to the pool."""
        if (
            not self.open
            or len(self._spares) >= SPARES
            or conn.invalidated
            or conn.closed
            or conn.in_transaction()
            or not _room_left(self._engine.pool)
        ):
            return False
        timer = asyncio.get_running_loop().call_later(MAX_IDLE, self._expire, conn)
        self._spares.append((conn, timer))
        return True

    async def receive(self, checkout: asyncio.Future[AsyncConnection]) -> None:
        """Park or close the connection of a checkout that its write no longer wants.

        The write was stopped while the connection was being opened; the connect
        was let finish (cut off, the driver may leave an error nobody retrieves),
        and a failed one is only noted: no write is waiting for it.
        """
        try:
            conn = await checkout
        except asyncio.CancelledError:
            if not checkout.cancelled():
                raise  # this task itself was cancelled
            return
        except Exception as exc:
            log.debug("writeturn: a connect no write waited for failed: %r", exc)
            return
        if not self.park(conn):
            try:
                await conn.close()
            except Exception as exc:
                log.debug("writeturn: closing a connection no write wanted failed: %r", exc)

    def drop_all(self) -> None:
        """Another connection died: the parked ones may have died with it (a restart)."""
        spares, self._spares = self._spares, []
        for conn, timer in spares:
            timer.cancel()
            self._discard(conn)

    def _expire(self, conn: AsyncConnection) -> None:
        for i, (parked, _) in enumerate(self._spares):
            if parked is conn:
                del self._spares[i]
                self._discard(conn)
                return

    def _discard(self, conn: AsyncConnection) -> None:
        task = asyncio.ensure_future(conn.close())
        self._closing.add(task)  # keep a reference until it is done
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every parked connection and wait for the closes under way."""
        self.open = False
        self.drop_all()
        while self._closing:
            done, _ = await asyncio.wait(set(self._closing))
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.debug("writeturn: closing a spare connection failed: %r", task.exception())


def _room_left(pool: Pool) -> bool:
    """Whether the pool could hand out one more connection at once, after this one.

    A connection parked here counts as checked out, so parking is safe only
    while someone else checking out would still not wait. Pools that open a
    connection per checkout (NullPool) always have room; pools that share one
    connection (StaticPool, SingletonThreadPool) never do.
    """
    if isinstance(pool, QueuePool):
        if pool.checkedin() > 0:
            return True
        max_overflow = getattr(pool, "_max_overflow", 0)
        if max_overflow < 0:
            return True  # unlimited overflow
        return pool.checkedout() < pool.size() + max_overflow
    return type(pool).__name__ == "NullPool"


def retire_generation(conn: AsyncConnection) -> None:
    """Tell ``conn``'s pool that it is lost, as SQLAlchemy tells the pool of a
    disconnect it sees itself: every connection the pool made before it is
    recycled at its next checkout. Call it before invalidating ``conn``.

    A restart, a kill of every backend or a failover leaves the pool full of
    connections as dead (or as useless for writes) as this one, and the next
    writes would otherwise meet them one by one.
    """
    sync = conn.sync_connection
    if sync is None or sync.invalidated:
        return
    try:
        sync.engine.pool._invalidate(sync.connection, _checkin=False)
    except Exception as exc:  # pragma: no cover - SQLAlchemy without the pool's hook
        log.debug("writeturn: the pool's connections could not be retired (%r)", exc)
