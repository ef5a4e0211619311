"""Waiting through cancellation: how a database call is kept whole.

A cancellation that lands inside a driver call makes SQLAlchemy treat the
connection as broken (it is invalidated and terminated, not rolled back), and
on aiosqlite the statement runs on regardless. So writeturn never lets a
cancellation land there. In a task writeturn does not own (the caller's, in
``transaction()``), each database call runs in a task of its own
(:func:`run_apart`) that refuses cancellation through its awaiter, so the
awaiting task sees ``CancelledError`` only once the call is done;
:func:`settle` does the same for any future. (writeturn's own worker tasks
run their calls inline in a :class:`GuardedTask`, which holds a cancellation
back while a call is in flight.)
The caller then decides, at a point of its choosing, to raise exactly one
``CancelledError``.

Accounting: neither function calls ``Task.uncancel()``. Every canceller
incremented the task's cancel count once, and the one ``CancelledError`` the
caller later re-raises is what each of them (``asyncio.timeout``, TaskGroup)
expects to see; only a cancellation that is swallowed for good is uncancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["settle", "run_apart", "GuardedTask"]

T = TypeVar("T")


async def settle(fut: asyncio.Future[Any], on_cancel: Callable[[], object] | None = None) -> bool:
    """Wait until ``fut`` is done, even if this task is cancelled meanwhile.

    ``fut`` itself is never cancelled by this wait. Returns True if the
    awaiting task was cancelled at least once; the caller then owes its own
    caller one ``CancelledError``. ``on_cancel`` runs at the first cancellation.
    """
    cancelled = False
    loop = asyncio.get_running_loop()
    while not fut.done():
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: asyncio.Future[Any], waiter: asyncio.Future[None] = waiter) -> None:
            if not waiter.done():
                waiter.set_result(None)

        fut.add_done_callback(wake)
        try:
            await waiter
        except asyncio.CancelledError:
            fut.remove_done_callback(wake)
            if not cancelled and on_cancel is not None:
                on_cancel()
            cancelled = True
    return cancelled


class _CallTask(asyncio.Task[T]):
    """A task its awaiter cannot cancel: the awaiter's cancellation waits for it.

    ``Task.cancel()`` of the awaiting task calls ``cancel()`` on the future it
    waits for; refusing here leaves this call running and makes asyncio raise
    ``CancelledError`` in the awaiter right when the call is done, which is
    exactly the promise of :func:`settle`, with no extra future or loop turn.
    """

    def __init__(self, coro: Coroutine[Any, Any, T], on_cancel: Callable[[], object] | None):
        super().__init__(coro)
        self._writeturn_on_cancel = on_cancel

    def cancel(self, msg: Any | None = None) -> bool:
        on_cancel, self._writeturn_on_cancel = self._writeturn_on_cancel, None
        if on_cancel is not None:
            on_cancel()
        return False


async def run_apart(
    coro: Coroutine[Any, Any, T], on_cancel: Callable[[], object] | None = None
) -> tuple[asyncio.Task[T], bool]:
    """Run ``coro`` to completion in its own task; return the finished task and
    whether the caller was cancelled while it ran (see :func:`settle`).

    ``on_cancel`` runs at the first cancellation. The task's exception is
    marked retrieved, so a result that nobody wants logs nothing; call
    ``task.result()`` to get it or raise it.
    """
    task = _CallTask(coro, on_cancel)
    cancelled = False
    while True:
        try:
            await task
        except asyncio.CancelledError:
            if not task.done() or task.cancelled():
                raise  # the call itself was cancelled: not ours to absorb
            cancelled = True
        except BaseException:
            pass
        if task.done():
            break
    if not task.cancelled():
        task.exception()
    return task, cancelled


class GuardedTask(asyncio.Task[T]):
    """writeturn's own task for a write: a cancellation never lands inside a database call.

    A ``cancel()`` that arrives while :meth:`guarded` runs a call is held back:
    ``on_cancel`` runs at once (to stop the statement after a grace period),
    and the caller of :meth:`guarded` delivers the held-back cancellations
    once the call has returned (:meth:`deliver`). Elsewhere ``cancel()``
    behaves as usual. This protects a call from every canceller, including
    the write function's own ``asyncio.timeout()`` around a statement, at
    the cost of no extra task per call.
    """

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        loop: asyncio.AbstractEventLoop,
        context: Any = None,
    ) -> None:
        super().__init__(coro, loop=loop, context=context)
        self._writeturn_on_cancel: Callable[[], object] | None = None
        self._writeturn_held = 0  # cancellations held back during a call

    def cancel(self, msg: Any | None = None) -> bool:
        on_cancel = self._writeturn_on_cancel
        if on_cancel is not None and not self.done():
            self._writeturn_held += 1
            on_cancel()
            return True
        return super().cancel(msg)

    async def guarded(self, coro: Coroutine[Any, Any, T], on_cancel: Callable[[], object]) -> T:
        """Await ``coro`` (a database call, run in this task) with cancellation held back."""
        self._writeturn_on_cancel = on_cancel
        try:
            return await coro
        finally:
            self._writeturn_on_cancel = None

    def hold(self) -> None:
        """A cancellation was absorbed (by :func:`settle`) where none may land: hold it
        back like one that arrived during a call, to be delivered later."""
        self.uncancel()
        self._writeturn_held += 1

    async def deliver(self) -> None:
        """Raise ``CancelledError`` here if cancellations were held back, counting each
        one as ``Task.cancel()`` would (so ``asyncio.timeout`` can take its own back)."""
        held, self._writeturn_held = self._writeturn_held, 0
        if held:
            for _ in range(held):
                super().cancel()
            await asyncio.sleep(0)  # the pending cancellation is raised here
