"""Group commit: several queued writes of one key share one transaction and one COMMIT.

The batch is the next ``batch_max`` turns of the key, in turn order, so order
and alternation are those of single writes. The writes run back to back, with
no savepoints (each one would cost a round trip, which is most of what
batching saves). When a write raises, or is cancelled, before the COMMIT, the
whole transaction is rolled back, that write alone is settled ROLLED_BACK, and
the batch runs again without it: a write function may therefore run more than
once, and must have no effects outside the transaction that a re-run would
repeat. A write cancelled before its function ran is simply left out
(WITHDRAWN). Once its function has returned, a write waits for the shared
COMMIT (state RAN) and a cancellation is only noted, as for a single write
whose COMMIT is under way: it commits, and a caller's cancellation is raised
afterwards. The noted cancellation stops it only if the batch is rolled back
for another write's sake before the COMMIT. The COMMIT is shared: every write
of the batch gets its outcome, never half of them.

# Invariants:
# - the key's turn (and SQLite's gate) is held until the last attempt ended
#   and the connection was returned; claimed writes are never in the queue;
# - a handle's ``_task`` is set only while its own function runs, so a
#   cancellation of one write never lands in another's function;
# - every handle of the batch is settled exactly once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from ._session import WriteSession
from ._transaction import GATE_KEY, Transaction
from .handle import Reason, State, WriteHandle
from .outcome import Outcome

if TYPE_CHECKING:
    from .serializer import WriteSerializer

__all__ = ["BatchRun"]


class BatchRun:
    """Runs one batch of writes of a key, from connection checkout to hand-over."""

    __slots__ = ("_ser", "_pending", "_txn")

    def __init__(self, ser: WriteSerializer, batch: list[WriteHandle[Any]]) -> None:
        self._ser = ser
        self._pending = batch
        self._txn = Transaction(ser, batch[0], 0)

    async def run(self) -> None:
        ser, txn = self._ser, self._txn
        try:
            if ser._gate is not None:
                await ser._gate.acquire(GATE_KEY)
                txn._gate_held = True
            while self._pending:
                if txn._conn is None or txn._conn.invalidated:
                    await self._fresh_connection()
                await self._attempt()
        except BaseException as exc:
            # The batch could not run (no connection, a failed BEGIN, ...):
            # every write still waiting ends with that error.
            for h in self._pending:
                self._settle(h, Outcome.ROLLED_BACK if h._state >= State.RUNNING else None, exc)
            self._pending.clear()
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
        finally:
            if txn._conn is not None:
                await txn._close()
            txn._release()

    async def _fresh_connection(self) -> None:
        txn = self._txn
        if txn._conn is not None:
            await txn._close()
            txn._conn = None
        await txn._connect(check_reason=False)

    async def _attempt(self) -> None:
        """One transaction over the writes still pending; settles what it can."""
        ser, txn = self._ser, self._txn
        conn = txn._conn_()
        txn._began = True
        txn._cancel_seen = False
        txn._xid = await txn.call(
            ser._dialect.begin(conn, self._pending[0].key), interruptible=False
        )
        session = WriteSession(
            txn, bind=conn, expire_on_commit=False, join_transaction_mode="rollback_only"
        )
        txn._session = session
        ran: list[tuple[WriteHandle[Any], Any]] = []
        for h in list(self._pending):
            if h._reason is not None:  # cancelled before its turn in this attempt
                self._pending.remove(h)
                self._settle(h, None, None)
                continue
            try:
                ran.append((h, await self._run_one(session, h)))
            except BaseException as exc:
                await self._undo(session)
                for earlier, _ in ran:  # rolled back with h: they run again
                    earlier._state = State.RUNNING
                self._pending.remove(h)
                self._settle(h, Outcome.ROLLED_BACK, exc)
                return
        await self._commit(ran)

    async def _run_one(self, session: AsyncSession, h: WriteHandle[Any]) -> Any:
        txn = self._txn
        txn._h = h
        txn._cancel_seen = False
        h._state = State.RUNNING
        h._task = asyncio.current_task()
        try:
            await txn.record_journal(h)
            if h.duplicate:  # applied once already: not again
                return None
            result = await h.start_function(session)
            # Flush now, so a failing statement is this write's failure.
            if session.new or session.dirty or session.deleted:
                await txn.call(AsyncSession.flush(session))
            if txn._cancel_seen or h._reason is not None:
                raise asyncio.CancelledError
            h._state = State.RAN
            return result
        finally:
            h._task = None

    async def _undo(self, session: AsyncSession) -> None:
        txn = self._txn
        await txn._rollback()
        txn._drop_session()

    async def _commit(self, ran: list[tuple[WriteHandle[Any], Any]]) -> None:
        txn = self._txn
        for h, _ in ran:
            h._state = State.COMMITTING
            h._disarm()
        txn._h = ran[0][0] if ran else txn._h
        try:
            await txn.call(txn._conn_().commit(), interruptible=False)
            outcome, error = Outcome.COMMITTED, None
        except Exception as exc:
            outcome, error = await txn._commit_failed(exc)
        txn._drop_session()
        for h, result in ran:
            self._settle(h, outcome, error, result)
        self._pending = [h for h in self._pending if not h.done()]

    def _settle(
        self,
        h: WriteHandle[Any],
        outcome: Outcome | None,
        error: BaseException | None,
        result: Any = None,
    ) -> None:
        """Give ``h`` its outcome (None: it never ran, so WITHDRAWN) and wake its awaiters."""
        if outcome is None:
            outcome = Outcome.ROLLED_BACK if h._state >= State.RUNNING else Outcome.WITHDRAWN
        h._set_outcome(outcome)
        if outcome is not Outcome.COMMITTED:
            h.seq, h.duplicate = None, False
        if h._reason is not None and outcome is not Outcome.COMMITTED:
            exc = h._reason_exception()
            if error is not None and not isinstance(error, asyncio.CancelledError):
                exc.__cause__ = error
            h._finish(exception=exc)
        elif h._reason is Reason.CANCEL:  # cancelled by its caller after its function ran
            h._finish(exception=asyncio.CancelledError())
        else:
            h._finish(result=result, exception=error)
