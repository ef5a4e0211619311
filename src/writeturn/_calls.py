"""The call funnel: every database call of a transaction goes through :meth:`Calls.call`,
so that no cancellation lands inside a statement.

Where a cancellation can land in a transaction, and what happens:

* the pool checkout (:meth:`~writeturn._lease.Lease.connect`): abandoned;
  nothing began, and the connect finishes in the background (its connection
  is parked or closed);
* BEGIN and the lock, the journal row, the write function's statements
  through :class:`~writeturn._session.WriteSession`, the flush before COMMIT
  (:meth:`Calls.call`): the statement finishes, or after ``cancel_grace`` the
  driver stops it with an ordinary error; then the runner rolls back;
* COMMIT, ROLLBACK and handing the connection back (``interruptible=False``):
  they run to the end; the cancellation is noted and raised afterwards.

A runner on writeturn's own task (``owns_task=True``) never cancels that task
while a call is in flight (it asks :meth:`Calls.stop` instead), so the call
runs inline. On a caller's task (``transaction()``), each call runs in a task
of its own (:func:`~writeturn._guard.run_apart`) that a cancellation cannot cut.

A statement that does not stop when interrupted, or a ROLLBACK that hangs (a
frozen server, a dead network), has its connection terminated after
``cleanup_timeout``: the call in flight then fails, and the turn passes on.

# Invariants:
# - a cancellation never lands inside a call: on the owned task it is held back
#   until the call returned, on a caller's task it waits for the call's own task;
# - once ``stopped`` (until resume()), no interruptible call starts;
# - an interrupt is scheduled only while a call is in flight, and sent no sooner
#   than ``cancel_grace`` after the stop that asked for it;
# - an interrupt sent for one statement has landed before the next call starts,
#   and the interrupt and terminate timers are disarmed as each call ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._guard import GuardedTask, run_apart, settle
from .dialects import Dialect
from .errors import TransactionOwnedError
from .stats import Counters

__all__ = ["Calls", "SessionGate"]

log = logging.getLogger("writeturn")

T = TypeVar("T")


class Calls:
    """The database calls of one transaction on ``conn``, for the write(s) holding ``key``'s turn.

    ``conn`` is the connection an interrupt or a terminate acts on; the
    transaction's lease keeps it current. ``stopped`` and ``in_call`` are plain
    attributes: they are read on every call.
    """

    __slots__ = (
        "conn",
        "stopped",
        "in_call",
        "_dialect",
        "_engine",
        "_counters",
        "_key",
        "_cancel_grace",
        "_cleanup_timeout",
        "_owns_task",
        "_on_cancel",
        "_cancel_pending",
        "_interrupt_timer",
        "_interrupt_task",
        "_terminate_timer",
        "_task",
    )

    def __init__(
        self,
        dialect: Dialect,
        engine: AsyncEngine,
        counters: Counters,
        key: str,
        *,
        cancel_grace: float,
        cleanup_timeout: float,
        owns_task: bool,
        on_cancel: Callable[[], object] | None = None,
        cancel_pending: Callable[[], bool] | None = None,
    ) -> None:
        self._dialect = dialect
        self._engine = engine
        self._counters = counters
        self._key = key
        self._cancel_grace = cancel_grace
        self._cleanup_timeout = cleanup_timeout
        self._owns_task = owns_task
        # transaction(): told when the caller's task was cancelled during a call
        # that must finish (COMMIT), and asked before each statement whether the
        # task still has a cancellation nobody took back.
        self._on_cancel = on_cancel
        self._cancel_pending = cancel_pending
        self.conn: AsyncConnection | None = None
        self.stopped = False  # the write being run was stopped: no new statement starts
        self.in_call = False  # a database call runs inline on the owned task
        self._interrupt_timer: asyncio.TimerHandle | None = None
        self._interrupt_task: asyncio.Task[None] | None = None
        self._terminate_timer: asyncio.TimerHandle | None = None
        #: The owned task the inline calls run on (owns_task), found at the first call.
        self._task: GuardedTask[Any] | None = None

    # -- stopping ------------------------------------------------------------------

    def stop(self) -> None:
        """The write being run was stopped: refuse new statements, and stop the one in
        flight after ``cancel_grace`` (never by cancelling into the driver)."""
        self.stopped = True
        if self.in_call:
            self._schedule_interrupt()

    def resume(self) -> None:
        """A batch moves on to its next write: a stop of the previous one no longer applies."""
        self.stopped = False

    # -- database calls --------------------------------------------------------------

    async def call(self, coro: Coroutine[Any, Any, T], *, interruptible: bool = True) -> T:
        """Run one database call so that no cancellation lands inside it.

        Interruptible calls (statements before COMMIT) refuse to start once the
        write was stopped, and raise ``CancelledError`` after finishing if a
        cancellation arrived meanwhile; one that outlives ``cancel_grace`` is
        stopped by the driver with an ordinary error. Other calls (COMMIT,
        ROLLBACK, close) always run to the end and return or raise what the
        database said; a cancellation is noted and raised afterwards.

        A cancellation that came from inside the write function (its own
        ``asyncio.timeout()`` around a statement) ends the statement, not the
        write: once it has been taken back, the next statement runs.
        """
        if interruptible and (
            self.stopped or (self._cancel_pending is not None and self._cancel_pending())
        ):
            coro.close()
            raise asyncio.CancelledError
        if self._owns_task:
            return await self._call_inline(coro, interruptible)
        task, cancelled = await run_apart(coro, self._schedule_interrupt if interruptible else None)
        if await self._finish_interrupt():
            cancelled = True
        if cancelled and interruptible:
            err = asyncio.CancelledError()
            if not task.cancelled():
                err.__context__ = task.exception()
            raise err
        if cancelled and self._on_cancel is not None:
            self._on_cancel()
        return task.result()

    async def _call_inline(self, coro: Coroutine[Any, Any, T], interruptible: bool) -> T:
        # Six to eight of these per write: the common path awaits nothing but the call.
        task = self._task
        if task is None:
            task = self._task = asyncio.current_task()  # type: ignore[assignment]
            assert isinstance(task, GuardedTask), "owns_task needs a GuardedTask"
        self.in_call = True
        try:
            result: T = await task.guarded(
                coro, self._schedule_interrupt if interruptible else _held_back
            )
            return result
        finally:
            self.in_call = False
            if (
                self._interrupt_timer is not None
                or self._interrupt_task is not None
                or self._terminate_timer is not None
            ) and await self._finish_interrupt():
                task.hold()
            if interruptible:
                if task._writeturn_held:
                    await task.deliver()  # a cancellation held back during the call lands here
                if self.stopped:
                    raise asyncio.CancelledError

    # -- the interrupt and the terminate timer -----------------------------------------

    def _schedule_interrupt(self) -> None:
        if self._interrupt_timer is not None or self._interrupt_task is not None:
            return
        loop = asyncio.get_running_loop()
        self._interrupt_timer = loop.call_later(self._cancel_grace, self._interrupt)

    def _interrupt(self) -> None:
        self._interrupt_timer = None
        if self.conn is None:
            return
        self._counters.interrupts += 1
        self._interrupt_task = asyncio.ensure_future(
            self._dialect.interrupt(self.conn, self._engine)
        )
        self.arm_terminate()

    def arm_terminate(self) -> None:
        """If the connection does not answer within cleanup_timeout, terminate it."""
        if self._terminate_timer is None:
            loop = asyncio.get_running_loop()
            self._terminate_timer = loop.call_later(self._cleanup_timeout, self._terminate)

    def disarm_terminate(self) -> None:
        if self._terminate_timer is not None:
            self._terminate_timer.cancel()
            self._terminate_timer = None

    def _terminate(self) -> None:
        # The statement or ROLLBACK hangs (a frozen server, a dead network):
        # close the socket; the call in flight then fails, the database rolls
        # back when it notices, and the turn passes on.
        self._terminate_timer = None
        if self.conn is not None:
            log.warning(
                "writeturn: the connection of the write on key %r did not answer within "
                "cleanup_timeout=%ss; terminating it",
                self._key,
                self._cleanup_timeout,
            )
            self._dialect.terminate(self.conn)

    async def _finish_interrupt(self) -> bool:
        """Wait until an interrupt on its way has landed: it could otherwise stop the
        *next* statement on this connection (ROLLBACK, or another write's).
        Returns True if the task was cancelled during that wait."""
        if self._interrupt_timer is not None:
            self._interrupt_timer.cancel()
            self._interrupt_timer = None
        self.disarm_terminate()
        task, self._interrupt_task = self._interrupt_task, None
        if task is None:
            return False
        cancelled = await settle(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("writeturn: interrupting a statement failed: %r", task.exception())
        return cancelled


def _held_back() -> None:
    """A cancellation during COMMIT or ROLLBACK: nothing to stop; it is raised later."""


class SessionGate:
    """The call function a session gets: refused once its transaction has ended."""

    __slots__ = ("_calls", "open")

    def __init__(self, calls: Calls) -> None:
        self._calls = calls
        self.open = True

    async def call(self, coro: Coroutine[Any, Any, T], *, interruptible: bool = True) -> T:
        if not self.open:
            coro.close()
            raise TransactionOwnedError(
                "this session belongs to a writeturn write that has ended; a task the write "
                "function started outlived it. Await such work inside the function, or start "
                "a new write for it"
            )
        return await self._calls.call(coro, interruptible=interruptible)
