"""Waiting through cancellation: how a database call is kept whole.

A cancellation that lands inside a driver call makes SQLAlchemy treat the
connection as broken (it is invalidated and terminated, not rolled back), and
on aiosqlite the statement runs on regardless. So writeturn never lets a
cancellation land there. In a task writeturn does not own (the caller's, in
``transaction()``), each database call runs in a task of its own
(:func:`run_apart`) that refuses cancellation through its awaiter, so the
awaiting task sees ``CancelledError`` only once the call is done;
:func:`settle` does the same for any future. (writeturn's own worker tasks
need neither: a handle never cancels its worker while a call is in flight.)
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

__all__ = ["settle", "run_apart"]

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
