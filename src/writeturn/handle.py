"""One write's record: its place in line, its state, and its truthful outcome."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import ConfigurationError, SerializerClosed, TurnTimeout
from .outcome import Outcome
from .turnlock import Waiter

if TYPE_CHECKING:
    from ._transaction import Transaction
    from .serializer import WriteSerializer

__all__ = ["WriteHandle"]

T = TypeVar("T")


class State(enum.IntEnum):
    """Where a write is; it only moves forward, with one exception: a batched
    write in RAN goes back to RUNNING when its batch is rolled back because of
    another write, and runs again."""

    QUEUED = 0  # waiting for its turn
    STARTING = 1  # granted the turn; its task has not begun the transaction yet
    RUNNING = 2  # inside its transaction, before COMMIT is sent
    # From here on a cancellation cannot stop the write, only be noted:
    RAN = 3  # in a batch: its function returned; it waits for the shared COMMIT
    ENDING = 4  # ROLLBACK sent
    COMMITTING = 5  # COMMIT sent
    DONE = 6


class Reason(enum.Enum):
    """Why writeturn itself interrupted a write (first reason wins)."""

    CANCEL = "cancel"
    TIMEOUT = "timeout"
    CLOSE = "close"


class _Settled(asyncio.Future[None]):
    """Resolved when a write settles. Its awaiters cannot cancel it: cancelling an
    awaiting task asks for the write to be cancelled instead, and asyncio raises
    ``CancelledError`` in that task once the write has settled."""

    def __init__(self, handle: WriteHandle[Any]) -> None:
        super().__init__()
        self._writeturn_handle = handle

    def cancel(self, msg: Any | None = None) -> bool:
        self._writeturn_handle.cancel()
        return False


class WriteHandle(Waiter, Generic[T]):
    """A submitted write: ``await`` it for the function's result; ``outcome`` never lies.

    ``outcome`` is ``PENDING`` until the write is done, then ``COMMITTED`` if
    and only if its effects are in the database. Awaiting returns the write
    function's result, or raises what ended the write: the function's own
    exception, ``CancelledError``, :class:`TurnTimeout`,
    :class:`SerializerClosed` or :class:`OutcomeUnknown`. If the task awaiting
    the handle is cancelled, the write is cancelled too; the await returns
    (raising ``CancelledError``) only once the write has settled.
    """

    __slots__ = (
        "key",
        "idempotency_key",
        "seq",
        "duplicate",
        "_journaled",
        "_retries",
        "_attempts",
        "_ser",
        "_fn",
        "_args",
        "_kwargs",
        "_context",
        "_timeout",
        "_timer",
        "_state",
        "_outcome",
        "_result",
        "_exception",
        "_done",
        "_grant",
        "_task",
        "_reason",
        "_cancels_sent",
        "_since",
        "_in_call",
        "__weakref__",
    )

    def __init__(
        self,
        ser: WriteSerializer,
        key: str,
        writer: str | None,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        idempotency_key: str | None = None,
        journaled: bool = False,
    ) -> None:
        super().__init__(writer)
        self.key = key
        #: The caller's idempotency key (None: none); see :meth:`WriteSerializer.submit`.
        self.idempotency_key = idempotency_key
        #: For a journaled write that committed: its gap-free sequence number on its key.
        self.seq: int | None = None
        #: True if an earlier write with the same idempotency key had already
        #: committed, so this one did not run its function (outcome COMMITTED).
        self.duplicate = False
        self._journaled = journaled
        self._retries = 0  # how many times a transient failure may be retried
        self._attempts = 0  # retries made so far
        self._ser = ser
        self._fn = fn  # None for a write run by transaction(): the caller's block
        self._args = args
        self._kwargs = kwargs
        self._context: contextvars.Context | None = None
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._state = State.QUEUED
        self._outcome = Outcome.PENDING
        self._result: T | None = None
        self._exception: BaseException | None = None
        self._done: _Settled | None = None  # made when first awaited
        self._grant: asyncio.Future[None] | None = None  # transaction(): the wait for the turn
        self._task: asyncio.Task[Any] | None = None  # the task running the transaction
        self._reason: Reason | None = None
        self._cancels_sent = 0  # task.cancel() calls writeturn made for this write
        # When it was queued; from the grant on, when it got its turn.
        self._since = time.monotonic()
        # Set while writeturn's own worker runs a database call inline.
        self._in_call: Transaction | None = None

    # -- public -----------------------------------------------------------

    @property
    def outcome(self) -> Outcome:
        """PENDING until done; then COMMITTED, ROLLED_BACK, WITHDRAWN or UNKNOWN."""
        return self._outcome

    def done(self) -> bool:
        """True once the write has settled and its outcome is final."""
        return self._state is State.DONE

    def cancel(self) -> bool:
        """Ask for the write to be cancelled; return False if it is already done.

        Queued: it is withdrawn at once (WITHDRAWN). Running: it is rolled
        back (ROLLED_BACK). Committing: the commit finishes and the outcome
        says what happened. In every case awaiting the handle then raises
        ``CancelledError``.
        """
        return self._interrupt(Reason.CANCEL)

    def result(self) -> T:
        """The write function's result; raises what ended the write, or
        ``asyncio.InvalidStateError`` if it is not done yet."""
        if self._state is not State.DONE:
            raise asyncio.InvalidStateError(f"{self!r} is not done; await it first")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[return-value]

    def exception(self) -> BaseException | None:
        """What ended the write (None if it returned normally); it must be done."""
        if self._state is not State.DONE:
            raise asyncio.InvalidStateError(f"{self!r} is not done; await it first")
        return self._exception

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    def __repr__(self) -> str:
        state = self._outcome.value if self._state is State.DONE else self._state.name.lower()
        return f"<WriteHandle key={self.key!r} writer={self.writer!r} {state}>"

    # -- the serializer's side ----------------------------------------------

    async def _wait(self) -> T:
        if self._state is not State.DONE:
            if self._done is None:
                self._done = _Settled(self)
            # A cancellation of this task cancels the write and lands here once
            # the write has settled (see _Settled).
            await self._done
        return self.result()

    def on_grant(self) -> None:
        self._granted()
        if self._grant is not None:
            if not self._grant.done():
                self._grant.set_result(None)
        else:
            self._ser._start_worker(self)

    def _granted(self) -> None:
        """The turn (or a place in a batch) is this write's now."""
        now = time.monotonic()
        self._ser._counters.waits.append(now - self._since)
        self._since = now
        self._state = State.STARTING

    def _interrupt(self, reason: Reason) -> bool:
        state = self._state
        if state is State.DONE:
            return False
        ser = self._ser
        ser._counters.cancel_requests += 1
        if state is State.RAN:
            # Noted: it applies only if the batch is rolled back before its
            # COMMIT (a caller's cancellation is raised after a COMMIT too).
            if self._reason is None:
                self._reason = reason
            return True
        if state >= State.ENDING:
            # Past the point of no return: COMMIT or ROLLBACK finishes. Only a
            # caller's cancellation is remembered, so that awaiting raises it.
            if reason is Reason.CANCEL and self._reason is None:
                self._reason = reason
            return True
        if self._reason is None:
            self._reason = reason
        if state is State.QUEUED:
            ser._turns.withdraw(self.key, self)
            self._set_outcome(Outcome.WITHDRAWN)
            exc = self._reason_exception()
            if self._grant is None:
                self._finish(exception=exc)
            elif isinstance(exc, asyncio.CancelledError):
                self._grant.cancel()
            else:
                self._grant.set_exception(exc)
            return True
        if self._in_call is not None:
            # Never cancel into a driver call: the statement finishes (or the
            # driver stops it after cancel_grace), then the write unwinds.
            self._in_call.request_interrupt()
        elif self._task is not None:
            self._cancels_sent += 1
            self._task.cancel()
        return True

    def start_function(self, session: Any) -> Awaitable[T]:
        """Call the write function on ``session``; what it returns must be awaited."""
        fn = self._fn
        assert fn is not None, "a transaction() write has no function"
        pending = fn(session, *self._args, **(self._kwargs or {}))
        if not inspect.isawaitable(pending):
            name = getattr(fn, "__qualname__", None) or repr(fn)
            raise ConfigurationError(
                f"the write function {name} returned {type(pending).__name__}, not an "
                "awaitable; it must be an `async def` taking the session first"
            )
        return pending

    def _expire(self) -> None:
        self._timer = None
        self._interrupt(Reason.TIMEOUT)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _reason_exception(self) -> BaseException:
        """The exception that reports why writeturn interrupted this write."""
        where = "while queued" if self._outcome is Outcome.WITHDRAWN else "while running"
        if self._reason is Reason.TIMEOUT:
            return TurnTimeout(
                f"write on key {self.key!r} (writer {self.writer!r}) timed out after "
                f"{self._timeout}s {where}; outcome {self._outcome.value}. Raise its timeout, "
                "or look at what holds the key: serializer.key_statistics(key)"
            )
        if self._reason is Reason.CLOSE:
            return SerializerClosed(
                f"write on key {self.key!r} (writer {self.writer!r}) was stopped {where} by "
                f"close() (drain=False, or its timeout ran out); outcome {self._outcome.value}"
            )
        return asyncio.CancelledError()

    def _cancellation(
        self, cause: BaseException | None, task: asyncio.Task[Any], entry_cancelling: int
    ) -> BaseException:
        """The exception to raise after a write ended through a cancellation.

        A timeout or close is writeturn's own cancellation: it is swallowed
        (``uncancel``) and reported as TurnTimeout / SerializerClosed, unless
        somebody else cancelled the task too, in which case their
        ``CancelledError`` propagates, as ``asyncio.timeout`` does it.
        """
        if (
            self._reason in (Reason.TIMEOUT, Reason.CLOSE)
            and self._outcome is not Outcome.COMMITTED
        ):
            for _ in range(self._cancels_sent):
                task.uncancel()
            self._cancels_sent = 0
            if task.cancelling() <= entry_cancelling:
                exc = self._reason_exception()
                if cause is not None and not isinstance(cause, asyncio.CancelledError):
                    exc.__cause__ = cause
                return exc
        if isinstance(cause, asyncio.CancelledError):
            return cause
        err = asyncio.CancelledError()
        err.__context__ = cause
        return err

    def _set_outcome(self, outcome: Outcome) -> None:
        assert self._outcome is Outcome.PENDING, "an outcome is decided once"
        self._outcome = outcome
        self._ser._counters.by_outcome[outcome] += 1

    def _finish(self, result: T | None = None, exception: BaseException | None = None) -> None:
        """Settle the handle: wake every awaiter. The outcome must be set."""
        if self._state is State.DONE:
            return
        assert self._outcome is not Outcome.PENDING
        if self._state >= State.STARTING:
            self._ser._counters.holds.append(time.monotonic() - self._since)
        self._state = State.DONE
        self._disarm()
        self._result = result
        self._exception = exception
        self._fn = self._args = self._kwargs = self._context = None  # type: ignore[assignment]
        self._task = None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        self._ser._forget(self)
