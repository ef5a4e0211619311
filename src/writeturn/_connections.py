"""Connections parked between writes, so the next write of any key skips the pool.

# Invariants:
# - at most SPARES connections are parked, each idle and outside a transaction;
# - a parked connection older than MAX_IDLE seconds is never handed out: it is closed;
# - a connection being closed is tracked until its close finished (drain()).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["ConnectionCache"]

log = logging.getLogger("writeturn")

SPARES = 2
MAX_IDLE = 1.0


class ConnectionCache:
    """Up to two idle connections kept checked out between writes, for at most a second."""

    __slots__ = ("_spares", "_closing", "open")

    def __init__(self) -> None:
        self._spares: list[tuple[AsyncConnection, float]] = []  # newest last
        self._closing: set[asyncio.Task[None]] = set()
        self.open = True  # False once the serializer closes: nothing is parked then

    def take(self) -> AsyncConnection | None:
        """A parked connection fresh enough to trust, or None."""
        now = time.monotonic()
        while self._spares:
            conn, parked = self._spares.pop()
            if now - parked <= MAX_IDLE and not conn.invalidated and not conn.closed:
                return conn
            self._discard(conn)
        return None

    def park(self, conn: AsyncConnection) -> bool:
        """Keep ``conn`` for the next write instead of returning it to the pool."""
        if (
            not self.open
            or len(self._spares) >= SPARES
            or conn.invalidated
            or conn.closed
            or conn.in_transaction()
        ):
            return False
        self._spares.append((conn, time.monotonic()))
        return True

    def drop_all(self) -> None:
        """Another connection died: the parked ones may have died with it (a restart)."""
        spares, self._spares = self._spares, []
        for conn, _ in spares:
            self._discard(conn)

    def _discard(self, conn: AsyncConnection) -> None:
        task = asyncio.ensure_future(conn.close())
        self._closing.add(task)  # keep a reference until it is done
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every parked connection and wait for the closes under way."""
        self.open = False
        spares, self._spares = self._spares, []
        for conn, _ in spares:
            try:
                await conn.close()
            except Exception as exc:
                log.debug("writeturn: closing a spare connection failed: %r", exc)
        while self._closing:
            await asyncio.wait(set(self._closing))
