"""Running one write: a submitted write on a task of its own, or a ``transaction()`` block.

Both drive a :class:`~writeturn._write.WriteRecord` through the steps of an
:class:`~writeturn._attempt.Attempt`, and both end the same way: the
transaction ends (COMMIT or ROLLBACK acknowledged, or the connection
discarded), the connection goes back, the :class:`~writeturn._turn.TurnHold`
hands SQLite's gate and then the key's turn on, and only then is the write
settled (guarantee 4).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, NoReturn

from ._attempt import Attempt
from ._guard import GuardedTask
from ._retry import retry_delay
from ._runtime import Runtime
from ._session import WriteSession
from ._transaction import Transaction
from ._turn import TurnHold
from ._write import State, Stop, WriteRecord
from .errors import ConfigurationError, OutcomeUnknown
from .outcome import Outcome

__all__ = ["SingleRun", "TransactionContext"]

_PASS_THROUGH = (KeyboardInterrupt, SystemExit)  # settled, then re-raised to the loop


class _Ending:
    """How one attempt ended. ``journaled``: the attempt recorded the write in the
    journal, which tells whether an earlier attempt committed (its idempotency key's
    row would have been there: the attempt would be a duplicate)."""

    __slots__ = ("outcome", "result", "error", "journaled")

    def __init__(
        self,
        outcome: Outcome,
        result: Any = None,
        error: BaseException | None = None,
        *,
        journaled: bool = False,
    ) -> None:
        self.outcome, self.result, self.error = outcome, result, error
        self.journaled = journaled


def _still_unknown(key: str, unknown: BaseException | None, last: _Ending) -> _Ending:
    """An earlier attempt's COMMIT may have landed and no later attempt could tell."""
    err = OutcomeUnknown(
        f"the write on key {key!r} may have committed: an earlier attempt's COMMIT was cut "
        "off and its fate could not be learned, and no retry could tell (the last one "
        f"ended {last.outcome.value}: {type(last.error).__name__}). Check the database, or "
        "submit it again with the same idempotency key, which applies it at most once"
    )
    err.__cause__ = last.error
    err.__context__ = unknown
    return _Ending(Outcome.UNKNOWN, None, err)


class SingleRun:
    """Runs one submitted write on writeturn's own task, retrying transient failures.

    The task is cancelled only where no database call is in flight; during a
    call a stop is handed to the transaction, which stops the statement
    after ``cancel_grace``.
    """

    __slots__ = ("_rt", "_record", "_task", "_txn", "_hold")

    def __init__(self, rt: Runtime, record: WriteRecord) -> None:
        self._rt = rt
        self._record = record
        self._txn: Transaction | None = None
        self._hold = TurnHold.of_write(rt, record)
        record.run_by(self)
        loop = asyncio.get_running_loop()
        self._task = GuardedTask(self._run(), loop=loop, context=record.context)
        self._task.add_done_callback(self._done)

    def stop(self, record: WriteRecord) -> None:
        if self._txn is not None:
            self._txn.stop()
        # During a database call the task holds the cancellation back until
        # the call returned (or was interrupted after cancel_grace).
        self._task.cancel()

    async def _run(self) -> None:
        rt, record = self._rt, self._record
        self._hold.mark(self._task)
        try:
            await self._hold.take_gate()  # a stop here withdraws from the gate's line
            # An earlier attempt whose COMMIT's fate is unknown: until a later attempt's
            # journal row tells (a retry after UNKNOWN has an idempotency key), the
            # write may have committed, whatever became of the later attempts.
            unknown: _Ending | None = None
            while True:
                ending = await self._attempt()
                if ending.outcome is Outcome.UNKNOWN:
                    unknown = ending
                elif ending.journaled:
                    unknown = None
                delay = retry_delay(
                    record,
                    ending.outcome,
                    ending.error,
                    dialect=rt.dialect.name,
                    backoff=rt.options.retry_backoff,
                    counters=rt.counters,
                )
                if delay is None:
                    break
                if record.state in (State.ROLLING_BACK, State.COMMITTING):
                    record.move(State.RETRY_WAIT)  # else it never began: no move to make
                try:
                    await asyncio.sleep(delay)  # keeps the turn: the write keeps its place
                except asyncio.CancelledError:
                    break  # stopped while waiting: it ends as the last attempt did
            if unknown is not None and ending.outcome is not Outcome.COMMITTED:
                if ending is not unknown:
                    ending = _still_unknown(record.key, unknown.error, ending)
        except BaseException as exc:  # stopped before it began, or the gate's wait failed
            ending = _Ending(record.unbegun_outcome, None, exc)
        self._txn = None
        self._hold.release()
        record.conclude(ending.outcome, ending.result, ending.error)
        if isinstance(ending.error, _PASS_THROUGH):
            raise ending.error

    async def _attempt(self) -> _Ending:
        rt, record = self._rt, self._record
        txn = self._txn = Transaction(rt, record.key, owns_task=True)
        attempt = Attempt(txn)
        try:
            result = await attempt.run(record, await attempt.open(record))
        except BaseException as exc:
            outcome, error = await attempt.abandon(record, exc)
            await txn.finish()
            return _Ending(outcome, None, error, journaled=attempt.journaled)
        if (
            rt.dialect.lock_orders_next
            and record.attempts >= record.retries
            and rt.connections.can_serve_another()
        ):
            # The database holds the next write of the key at its lock until
            # this COMMIT has ended, so its BEGIN may go out now. Only a write
            # that cannot run again passes its turn on early (a retry keeps its
            # place in line), and only while the next write can have a
            # connection at once (else it would wait for this one anyway, and
            # could meet the pool's timeout).
            assert rt.gate is None
            self._hold.pass_turn()
        ((outcome, error),) = await attempt.commit((record,))
        await txn.finish()
        committed = outcome is Outcome.COMMITTED
        return _Ending(outcome, result if committed else None, error, journaled=attempt.journaled)

    def _done(self, task: asyncio.Task[None]) -> None:
        record = self._record
        if record.state is State.DONE:
            return
        # Cancelled before its first step, the task ran no code: the turn it
        # was granted is still held. Pass it on; the write never began.
        assert record.state is State.GRANTED, f"{record!r} left unsettled by its task"
        self._hold.release()
        record.conclude(Outcome.WITHDRAWN, None, asyncio.CancelledError())


class TransactionContext:
    """``async with ser.transaction(...) as session``: waits for the turn, then one transaction.

    The block runs in the caller's task, so a stop (timeout, ``ctx.handle.cancel()``,
    ``close(drain=False)``) cancels that task; the cancellation is taken back
    (``uncancel``) and reported as TurnTimeout or SerializerClosed, unless
    somebody else cancelled the task too, whose ``CancelledError`` then
    propagates, as ``asyncio.timeout`` expects.
    """

    __slots__ = (
        "_rt",
        "_record",
        "handle",
        "_task",
        "_entry",
        "_sent",
        "_txn",
        "_attempt",
        "_hold",
        "_entered",
    )

    def __init__(self, rt: Runtime, record: WriteRecord, handle: Any) -> None:
        self._rt = rt
        self._record = record
        #: The block's :class:`WriteHandle`: ``ctx.handle.cancel()``, ``ctx.handle.outcome``.
        self.handle = handle
        self._task: asyncio.Task[Any] | None = None
        self._entry = 0  # the task's cancel count when the block was entered
        self._sent = 0  # cancels writeturn itself sent to the task
        self._txn: Transaction | None = None
        self._attempt: Attempt | None = None
        self._hold: TurnHold | None = None  # from the grant on
        self._entered = False

    # -- the Runner interface ------------------------------------------------------

    def stop(self, record: WriteRecord) -> None:
        if self._txn is not None:
            self._txn.stop()
        task = self._task
        assert task is not None
        if task.cancelling() > self._entry + self._sent:
            return  # the task is being cancelled already; one CancelledError is enough
        self._sent += 1
        task.cancel()

    def _cancel_pending(self) -> bool:
        """The caller's task has a cancellation that nobody took back (an inner
        ``asyncio.timeout()`` takes its own back; an outer one does not)."""
        task = self._task
        assert task is not None
        return task.cancelling() > self._entry + self._sent

    def _on_task_cancel(self) -> None:
        """The caller's task was cancelled during a database call."""
        task = self._task
        assert task is not None
        if task.cancelling() > self._entry + self._sent:  # not by writeturn: by its caller
            self._record.request_stop(Stop.CANCEL)

    # -- entering --------------------------------------------------------------------

    async def __aenter__(self) -> WriteSession:
        rt, record = self._rt, self._record
        if self._entered:
            raise ConfigurationError(
                "this transaction() context was already entered; call ser.transaction() again "
                "for another write"
            )
        self._entered = True
        task = asyncio.current_task()
        assert task is not None
        self._task, self._entry = task, task.cancelling()
        record.run_by(self)
        rt.enter(record)
        if not rt.lifecycle.accepts_writes:
            # Made while the serializer was started, entered after close() was called:
            # refused as a write offered now would be (its outcome WITHDRAWN).
            refused = rt.lifecycle.refusal()
            record.settle(Outcome.WITHDRAWN, exception=refused)
            raise refused
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        record.add_waiter(granted)
        record.arm(on_grant=lambda _: _resolve(granted))
        if rt.turns.enqueue(record.key, record):
            record.on_grant()
        try:
            await granted
        except asyncio.CancelledError as exc:
            if record.state is not State.DONE:
                record.request_stop(Stop.CANCEL)  # QUEUED: withdrawn and settled
            if record.state is State.GRANTED:  # granted as it was cancelled: pass it on
                self._hold = TurnHold.of_write(rt, record)
                self._end(Outcome.WITHDRAWN, exc)
            raise self._raising(exc) from None
        if record.state is State.DONE:  # stopped while queued (timeout, close, cancel)
            raise self._raising(None)
        hold = self._hold = TurnHold.of_write(rt, record)
        hold.mark(task)
        txn = self._txn = Transaction(
            rt,
            record.key,
            owns_task=False,
            on_cancel=self._on_task_cancel,
            cancel_pending=self._cancel_pending,
        )
        attempt = self._attempt = Attempt(txn)
        try:
            await hold.take_gate()
            session = await attempt.open(record)
            await attempt.journal(record)
            return session
        except BaseException as exc:
            await self._fail(exc)

    async def _fail(self, exc: BaseException) -> NoReturn:
        """The block never ran: end the write and raise what it ends with."""
        record, txn, attempt = self._record, self._txn, self._attempt
        assert txn is not None and attempt is not None
        outcome, error = await attempt.abandon(record, exc)
        await txn.finish()
        self._end(outcome, error)
        final = self._raising(exc)
        if final is exc:
            raise exc
        raise final from final.__cause__

    # -- leaving --------------------------------------------------------------------------

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        record, txn, attempt, task = self._record, self._txn, self._attempt, self._task
        assert txn is not None and attempt is not None and task is not None
        if record.stop is None and (
            isinstance(exc, asyncio.CancelledError) or self._cancel_pending()
        ):
            self._on_task_cancel()  # the caller's own cancellation, in the block's code
        if exc is None and not txn.stopped and record.stop is None:
            try:
                await txn.flush()
            except BaseException as flush_error:
                exc = flush_error
        if exc is None and not txn.stopped and record.stop is None:
            ((outcome, error),) = await attempt.commit((record,))
        else:
            outcome, error = await attempt.abandon(
                record, exc if exc is not None else asyncio.CancelledError()
            )
        await txn.finish()
        self._end(outcome, error)
        final = self._final(exc)
        if final is None or final is exc:
            return False
        raise final from final.__cause__

    def _end(self, outcome: Outcome, error: BaseException | None) -> None:
        assert self._hold is not None
        self._hold.release()
        self._record.conclude(outcome, None, error)

    def _raising(self, raised: BaseException | None) -> BaseException:
        """The exception a block that did not commit raises."""
        final = self._final(raised)
        assert final is not None, "a write that did not commit ends with an exception"
        return final

    def _final(self, raised: BaseException | None) -> BaseException | None:
        """What leaves the block: the write's exception, with the task's cancel count
        restored for writeturn's own stops (see the class docstring)."""
        record, task = self._record, self._task
        assert task is not None
        final = record.exception
        if record.stop in (Stop.TIMEOUT, Stop.CLOSE):
            for _ in range(self._sent):
                task.uncancel()
            self._sent = 0
        if task.cancelling() > self._entry and not isinstance(final, asyncio.CancelledError):
            err = asyncio.CancelledError()  # somebody else cancelled the task too
            err.__context__ = final
            return err
        if isinstance(final, asyncio.CancelledError) and isinstance(raised, asyncio.CancelledError):
            return raised
        return final


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
