"""The session a write function receives: an AsyncSession whose database calls
cannot be cut in half by a cancellation.

Each guarded method runs through the ``call`` function it was given: the
statement completes (or, after a grace period, is interrupted by the driver
and fails with an ordinary error), and only then does the cancellation reach
the write function, as ``CancelledError``. The connection therefore stays
usable and is rolled back and returned to the pool, not terminated.

Savepoints from ``begin_nested()`` are guarded too: SAVEPOINT like a
statement, and RELEASE or ROLLBACK TO always run to the end.

Not guarded: iterating a server-side result from ``stream()``, and calls made
on the raw connection from ``session.connection()``. A cancellation landing
there is still safe (the connection is invalidated and the database rolls the
transaction back) but costs a reconnect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn

from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

from .errors import TransactionOwnedError

__all__ = ["WriteSession", "Call"]

#: Runs one database call of the write so that no cancellation lands inside it;
#: ``interruptible=False`` for calls that must finish (the end of a savepoint).
Call = Callable[..., Awaitable[Any]]

_GUARDED = (
    "execute",
    "scalar",
    "scalars",
    "get",
    "get_one",
    "refresh",
    "merge",
    "merge_all",
    "delete",
    "delete_all",
    "flush",
    "run_sync",
    "stream",
    "stream_scalars",
    "connection",
)


class WriteSession(AsyncSession):
    """An AsyncSession in one writeturn transaction: cancellations land only between statements.

    writeturn owns the transaction: it commits when the write function returns
    and rolls back when it raises. ``commit()`` and ``rollback()`` therefore
    raise :class:`TransactionOwnedError`; use ``begin_nested()`` for a
    savepoint. Not safe for use from concurrent tasks (like any AsyncSession), and
    refused (:class:`TransactionOwnedError`) once its write has ended.
    """

    _writeturn_call: Call

    def __init__(self, call: Call, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._writeturn_call = call

    async def commit(self) -> NoReturn:
        """Refused: writeturn commits when the write function returns."""
        raise TransactionOwnedError(
            "session.commit() inside a writeturn write: writeturn commits when your function "
            "returns (or the `async with` block exits cleanly); remove the commit() call, or "
            "use `await session.flush()` to send pending changes now"
        )

    def begin_nested(self) -> AsyncSessionTransaction:
        """A SAVEPOINT: ``async with session.begin_nested():`` rolls back only its block
        when the block raises. Its end (RELEASE or ROLLBACK TO) is never cut by a
        cancellation."""
        return _Savepoint(self, nested=True)

    async def rollback(self) -> NoReturn:
        """Refused: raise an exception to roll the write back."""
        raise TransactionOwnedError(
            "session.rollback() inside a writeturn write: raise an exception from your function "
            "(or the `async with` block) to roll the write back; use `session.begin_nested()` "
            "for a savepoint you can roll back on its own"
        )


class _Savepoint(AsyncSessionTransaction):
    """A savepoint whose statements go through the write's call function."""

    session: WriteSession

    async def start(self, is_ctxmanager: bool = False) -> AsyncSessionTransaction:
        result: AsyncSessionTransaction = await self.session._writeturn_call(
            super().start(is_ctxmanager)
        )
        return result

    async def commit(self) -> None:
        await self.session._writeturn_call(super().commit(), interruptible=False)

    async def rollback(self) -> None:
        await self.session._writeturn_call(super().rollback(), interruptible=False)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        await self.session._writeturn_call(
            super().__aexit__(type_, value, traceback), interruptible=False
        )


def _guarded(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    base = getattr(AsyncSession, name)

    async def method(self: WriteSession, *args: Any, **kwargs: Any) -> Any:
        return await self._writeturn_call(base(self, *args, **kwargs))

    method.__name__ = name
    method.__qualname__ = f"WriteSession.{name}"
    method.__doc__ = base.__doc__
    return method


for _name in _GUARDED:
    setattr(WriteSession, _name, _guarded(_name))
del _name
