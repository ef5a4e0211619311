"""Group commit: several queued writes of one key share one transaction and one COMMIT.

The batch is the next ``batch_max`` turns of the key, in turn order, so order
and alternation are those of single writes. The writes run back to back, with
no savepoints (each one would cost a round trip, which is most of what
batching saves). When a write raises, or is stopped, before the COMMIT, the
whole transaction is rolled back, that write alone is settled ROLLED_BACK (or
waits to be retried, if its failure is transient and it has retries left),
and the batch runs again without it: a write function may therefore run more
than once, and must have no effects outside the transaction that a re-run
would repeat. A write stopped while it is not running (waiting in the batch,
during the batch window, the BEGIN, or a retry's back-off) is settled at
once. A BEGIN that fails (another process held SQLite's lock past the busy
timeout, a lost connection) fails the writes still pending as it fails a
single write: each is ROLLED_BACK, or, if the error is transient and it has
retries left, the batch runs again after the back-off. Once its function
has returned, a write waits for the shared COMMIT (state RAN) and a stop is
only noted, as for a single write whose COMMIT is under way: it commits,
and a caller's cancellation is raised afterwards. The noted stop ends it
only if the batch is rolled back for another write's sake before the
COMMIT. The COMMIT is shared: every write of the batch gets its outcome,
never half of them.

# Invariants:
# - the batch holds the key's turn (taken over from its first write) and
#   SQLite's gate until the last attempt ended and the connection was handed
#   back, and hands the turn on exactly once: at the end of its run, or, if
#   its task was cancelled before its first step, in the task's done callback;
#   claimed writes are never in the queue;
# - the task is cancelled only for the write whose function runs now
#   (``_current``), or when no write is left, so a stop never lands in another
#   write's function; during a database call the cancellation is held back;
# - every write of the batch is settled exactly once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._attempt import Attempt
from ._guard import GuardedTask
from ._retry import retry_delay
from ._runtime import Runtime
from ._transaction import Transaction
from ._turn import TurnHold
from ._write import State, WriteRecord
from .outcome import Outcome

__all__ = ["BatchRun"]


class BatchRun:
    """Runs one batch of writes of a key, from its window to the hand-over of the turn."""

    __slots__ = ("_rt", "_key", "_pending", "_current", "_txn", "_task", "_hold", "_started")

    def __init__(self, rt: Runtime, leader: WriteRecord) -> None:
        self._rt = rt
        self._key = leader.key
        leader.transfer_turn()
        leader.run_by(self)
        self._pending: list[WriteRecord] = [leader]
        self._current: WriteRecord | None = None  # the write whose function runs now
        self._txn = Transaction(rt, leader.key, owns_task=True)
        self._hold = TurnHold.of_batch(rt, leader.key)
        self._started = False
        loop = asyncio.get_running_loop()
        self._task = GuardedTask(self._run(), loop=loop, context=leader.context)
        self._task.add_done_callback(self._done)
        rt.keep(self._task)

    # -- the Runner interface ------------------------------------------------------

    def stop(self, record: WriteRecord) -> None:
        txn = self._txn
        if record is self._current:
            txn.stop()
            self._task.cancel()  # held back during a database call (GuardedTask)
            return
        # Not running now (waiting in the batch, or in a retry's back-off): it ends at once.
        self._pending.remove(record)
        record.conclude(record.unbegun_outcome, None, asyncio.CancelledError())
        if not self._pending and self._current is None:
            # Nobody is left to wait for: stop the window, the gate's wait, the
            # back-off or a checkout at once; a BEGIN in flight is interrupted.
            txn.stop()
            self._task.cancel()

    # -- the run --------------------------------------------------------------------

    async def _run(self) -> None:
        self._started = True
        txn, hold = self._txn, self._hold
        hold.mark(self._task)
        try:
            await self._gather()
            if self._pending:
                await hold.take_gate()
            while self._pending:
                await self._attempt()
        except BaseException as exc:
            # The batch could not run (no connection, the gate's wait failed, a
            # stop during BEGIN): every write still waiting ends with that error.
            if txn.began:
                await txn.rollback()
            error = txn.explain(Outcome.ROLLED_BACK, exc)
            for record in self._pending:
                if record.state is State.RUNNING:
                    record.move(State.ROLLING_BACK)
                record.conclude(
                    Outcome.ROLLED_BACK if record.began else Outcome.WITHDRAWN, None, error
                )
            self._pending.clear()
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
        finally:
            await txn.finish()
            hold.release()

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._started:
            return  # _run's own ``finally`` handed the turn on
        # Cancelled before its first step (its only write was stopped as the turn
        # came, see stop()), the task ran no code: pass the key's turn on here.
        for record in self._pending:
            record.conclude(record.unbegun_outcome, None, asyncio.CancelledError())
        self._pending.clear()
        self._hold.release()

    async def _gather(self) -> None:
        """Claim the next writes in line; wait ``batch_window`` for more only where
        others were already in line (a lone writer would pay the window each time)."""
        opts = self._rt.options
        self._claim(opts.batch_max - 1)
        if 1 < len(self._pending) < opts.batch_max and opts.batch_window > 0:
            await asyncio.sleep(opts.batch_window)  # a write stopped meanwhile ends at once
            self._claim(opts.batch_max - len(self._pending))

    def _claim(self, limit: int) -> None:
        rt = self._rt
        for waiter in rt.turns.claim(self._key, limit, accept=_batchable):
            assert isinstance(waiter, WriteRecord)
            waiter.granted()
            waiter.run_by(self)
            self._pending.append(waiter)

    def _deadline(self) -> float | None:
        """A BEGIN that waits for another process's lock waits for the latest writer."""
        deadlines = [r.deadline for r in self._pending]
        if any(d is None for d in deadlines):
            return None
        return max(d for d in deadlines if d is not None)

    async def _attempt(self) -> None:
        """One transaction over the writes still pending; settles what it can."""
        txn = self._txn
        attempt = Attempt(txn)
        await attempt.connect()
        if not self._pending:
            return
        try:
            await attempt.begin(self._deadline())
        except Exception as exc:  # a stop (CancelledError) ends the batch in _run
            await self._begin_failed(exc)
            return
        session = txn.session()
        ran: list[tuple[WriteRecord, Any]] = []
        for record in list(self._pending):
            if record.state is State.DONE:  # stopped while an earlier write ran
                continue
            self._current = record
            txn.resume()
            record.move(State.RUNNING)
            try:
                result = await attempt.run(record, session)
            except BaseException as exc:
                self._current = None
                _, error = await attempt.abandon(record, exc)
                await self._failed(record, exc, error, ran)
                return
            self._current = None
            record.move(State.RAN)
            ran.append((record, result))
        if ran:
            await self._commit(attempt, ran)
        else:  # every write was stopped while an earlier one ran
            await txn.rollback()

    async def _begin_failed(self, exc: Exception) -> None:
        """BEGIN failed (SQLite busy past its timeout, a lost connection): every write
        still pending ends, or is retried, exactly as a single write whose BEGIN failed."""
        txn = self._txn
        await txn.rollback()  # a write stopped meanwhile ended at once (see stop())
        error = txn.explain(Outcome.ROLLED_BACK, exc)
        for record in self._pending:
            # A single write's BEGIN is part of its run (RUNNING): the batch's is
            # each of its writes' too, so each rolls back and may be retried.
            record.move(State.RUNNING)
            record.move(State.ROLLING_BACK)
        await self._end_or_retry([(r, Outcome.ROLLED_BACK, None, error) for r in self._pending])

    async def _failed(
        self,
        record: WriteRecord,
        exc: BaseException,
        error: BaseException | None,
        ran: list[tuple[WriteRecord, Any]],
    ) -> None:
        """``record`` failed with ``exc`` (ending with ``error``) and the transaction was
        rolled back: the others run again."""
        for other, _ in ran:
            if other.stop is not None:  # a stop noted while it waited ends it now
                self._pending.remove(other)
                other.conclude(Outcome.ROLLED_BACK, None, asyncio.CancelledError())
            else:
                other.move(State.GRANTED)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise exc
        await self._end_or_retry([(record, Outcome.ROLLED_BACK, None, error)])

    async def _commit(self, attempt: Attempt, ran: list[tuple[WriteRecord, Any]]) -> None:
        outcomes = await attempt.commit([record for record, _ in ran])
        await self._end_or_retry(
            [
                (record, outcome, result, error)
                for (record, result), (outcome, error) in zip(ran, outcomes, strict=True)
            ]
        )

    async def _end_or_retry(
        self, endings: list[tuple[WriteRecord, Outcome, Any, BaseException | None]]
    ) -> None:
        """Settle each write whose attempt ended for good, with (outcome, result, error);
        the others (a transient failure, retries left) wait to run again, together,
        after the longest of their back-offs, while the connection goes back."""
        rt = self._rt
        retry: float | None = None
        for record, outcome, result, error in endings:
            delay = retry_delay(
                record,
                outcome,
                error,
                dialect=rt.dialect.name,
                backoff=rt.options.retry_backoff,
                counters=rt.counters,
            )
            if delay is None:
                self._pending.remove(record)
                record.conclude(outcome, result if outcome is Outcome.COMMITTED else None, error)
                continue
            record.move(State.RETRY_WAIT)
            retry = delay if retry is None else max(retry, delay)
        if retry is not None:
            await self._txn.finish()
            await self._back_off(retry)

    async def _back_off(self, delay: float) -> None:
        """Wait before a retry; writes stopped meanwhile end at once (see stop())."""
        await asyncio.sleep(delay)


def _batchable(waiter: object) -> bool:
    """Only submitted writes join a batch (a transaction() block runs in its own task)."""
    return isinstance(waiter, WriteRecord) and waiter.fn is not None
