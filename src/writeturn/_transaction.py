"""One write's transaction, from connection checkout to hand-over of the turn.

Where a cancellation can land, and what happens (each await below is one):

* waiting for SQLite's database-wide gate: the wait is withdrawn (or the gate
  passed on); nothing began, so the write is WITHDRAWN;
* checking a connection out of the pool (or taking a parked one): the
  checkout is abandoned; WITHDRAWN;
* BEGIN and, in advisory mode, the lock statement; the journal row; the write function's own
  statements through :class:`WriteSession`; the flush before COMMIT: the
  statement finishes (or is interrupted by the driver after ``cancel_grace``),
  then the transaction is rolled back; ROLLED_BACK;
* the write function's other awaits: ``CancelledError`` unwinds it; ROLLED_BACK;
* COMMIT, ROLLBACK and returning the connection: not interruptible; the
  cancellation is noted and raised once they are done (from ENDING on, the
  handle no longer cancels writeturn's own worker task, so there these calls
  run inline);
* the back-off before a retry (in the serializer's worker): the write ends
  ROLLED_BACK and hands the turn on.

Only then is the turn handed on (guarantee 4), and the cancellation re-raised
as exactly one ``CancelledError`` (or, for writeturn's own timeout or close,
as TurnTimeout / SerializerClosed).

# Invariants:
# - the key's turn (and on SQLite the gate) is held from before __aenter__
#   until _end() releases it, exactly once, after COMMIT/ROLLBACK returned or
#   the connection was invalidated;
# - every database call goes through call(): in a task of its own, or inline
#   only where no cancellation can reach the task (owns_task, state >= ENDING);
# - _began is set before BEGIN is sent, so a cut-off BEGIN is rolled back too.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from . import journal
from ._guard import run_apart, settle
from ._session import WriteSession
from .errors import ConnectionLost, DatabaseUnreachable, OutcomeUnknown
from .handle import State, WriteHandle
from .outcome import Outcome
from .urls import describe_error, redact

if TYPE_CHECKING:
    from .serializer import WriteSerializer

__all__ = ["Transaction", "RetryWrite", "GATE_KEY", "writer_text"]

log = logging.getLogger("writeturn")

T = TypeVar("T")

GATE_KEY = ""  # the one key of SQLite's database-wide write gate


class RetryWrite(Exception):
    """Raised out of a write's transaction when it will run again (internal)."""

    def __init__(self, delay: float, cause: BaseException) -> None:
        super().__init__(f"retry in {delay:.3f}s after {type(cause).__name__}")
        self.delay = delay
        self.cause = cause


class Transaction:
    """The transaction of one write that holds its key's turn; an async context manager."""

    __slots__ = (
        "_ser",
        "_h",
        "_task",
        "_entry_cancelling",
        "_conn",
        "_session",
        "_began",
        "_gate_held",
        "_owns_task",
        "_cancel_seen",
        "_xid",
        "_interrupt_timer",
        "_interrupt_task",
        "_terminate_timer",
    )

    def __init__(
        self,
        ser: WriteSerializer,
        h: WriteHandle[Any],
        entry_cancelling: int,
        *,
        gate_held: bool = False,
        owns_task: bool = False,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._ser = ser
        self._h = h
        self._task = task
        self._entry_cancelling = entry_cancelling
        self._conn: AsyncConnection | None = None
        self._session: WriteSession | None = None
        self._began = False
        self._gate_held = gate_held  # a retry inherits the gate from its first attempt
        # True when the task is writeturn's own worker, which nothing but the
        # write's handle cancels, and no longer from ENDING on.
        self._owns_task = owns_task
        self._cancel_seen = False
        self._xid: int | None = None
        self._interrupt_timer: asyncio.TimerHandle | None = None
        self._interrupt_task: asyncio.Task[None] | None = None
        self._terminate_timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> WriteSession:
        ser, h = self._ser, self._h
        h._task = self._task
        h._state = State.RUNNING
        try:
            if h._reason is not None:
                raise asyncio.CancelledError
            if ser._gate is not None and not self._gate_held:
                await ser._gate.acquire(GATE_KEY)
                self._gate_held = True
            await self._connect()
            self._began = True
            self._xid = await self._begin()
            await self.record_journal(h)
            self._session = WriteSession(
                self,
                bind=self._conn,
                expire_on_commit=False,
                join_transaction_mode="rollback_only",
            )
        except BaseException as exc:
            final = await self._end(exc)
            assert final is not None
            if final is exc:
                raise
            raise final from final.__cause__
        return self._session

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        final = await self._end(exc)
        if final is None or final is exc:
            return False
        raise final

    # -- database calls ------------------------------------------------------

    async def call(self, coro: Coroutine[Any, Any, T], *, interruptible: bool = True) -> T:
        """Run one database call so that no cancellation lands inside it.

        Interruptible calls (statements before COMMIT) refuse to start once the
        write is cancelled, and raise ``CancelledError`` after finishing if it
        was cancelled meanwhile; a statement that outlives ``cancel_grace``
        after the cancellation is stopped by the driver. Other calls (COMMIT,
        ROLLBACK, close) always run to the end and return normally; the
        cancellation is remembered for :meth:`_end`.
        """
        if interruptible and (self._cancel_seen or self._h._reason is not None):
            coro.close()
            raise asyncio.CancelledError
        if self._owns_task:
            return await self._call_inline(coro, interruptible)
        task, cancelled = await run_apart(coro, self._schedule_interrupt if interruptible else None)
        await self._finish_interrupt()
        if cancelled:
            self._cancel_seen = True
        if interruptible and self._cancel_seen:
            err = asyncio.CancelledError()
            if not task.cancelled():
                err.__context__ = task.exception()
            raise err
        return task.result()

    async def _call_inline(self, coro: Coroutine[Any, Any, T], interruptible: bool) -> T:
        """A call on writeturn's own worker, which the handle never cancels
        while ``_in_call`` is set: no task of its own is needed."""
        h = self._h
        h._in_call = self
        try:
            result = await coro
        except BaseException as exc:
            h._in_call = None
            await self._finish_interrupt()
            if interruptible and h._reason is not None:
                raise asyncio.CancelledError from exc
            raise
        h._in_call = None
        await self._finish_interrupt()
        if interruptible and h._reason is not None:
            raise asyncio.CancelledError
        return result

    def request_interrupt(self) -> None:
        """The write was cancelled while its worker runs a call inline."""
        if self._interrupt_timer is None and self._interrupt_task is None:
            self._schedule_interrupt()

    def _schedule_interrupt(self) -> None:
        grace = self._ser._cancel_grace
        self._interrupt_timer = asyncio.get_running_loop().call_later(grace, self._interrupt)

    def _interrupt(self) -> None:
        self._interrupt_timer = None
        if self._conn is None:
            return
        self._ser._counters.interrupts += 1
        self._interrupt_task = asyncio.ensure_future(
            self._ser._dialect.interrupt(self._conn, self._ser._engine)
        )
        self._arm_terminate()

    def _arm_terminate(self) -> None:
        """If the connection does not answer within cleanup_timeout, terminate it."""
        if self._terminate_timer is None:
            loop = asyncio.get_running_loop()
            self._terminate_timer = loop.call_later(self._ser._cleanup_timeout, self._terminate)

    def _disarm_terminate(self) -> None:
        if self._terminate_timer is not None:
            self._terminate_timer.cancel()
            self._terminate_timer = None

    def _terminate(self) -> None:
        # The statement or ROLLBACK hangs (a frozen server, a dead network):
        # close the socket; the call in flight then fails, the database rolls
        # back when it notices, and the turn passes on.
        self._terminate_timer = None
        if self._conn is not None:
            log.warning(
                "writeturn: the connection of the write on key %r did not answer within "
                "cleanup_timeout=%ss; terminating it",
                self._h.key,
                self._ser._cleanup_timeout,
            )
            self._ser._dialect.terminate(self._conn)

    async def _finish_interrupt(self) -> None:
        # An interrupt still on its way could stop the *next* statement on
        # this connection (ROLLBACK, or another write's): wait until it landed.
        if self._interrupt_timer is not None:
            self._interrupt_timer.cancel()
            self._interrupt_timer = None
        self._disarm_terminate()
        task, self._interrupt_task = self._interrupt_task, None
        if task is not None:
            if await settle(task):
                self._cancel_seen = True
            if not task.cancelled() and task.exception() is not None:
                log.warning("writeturn: interrupting a statement failed: %r", task.exception())

    async def record_journal(self, h: WriteHandle[Any]) -> None:
        """Insert ``h``'s journal row in this transaction, if it is journaled."""
        if h._journaled:
            entry = await self.call(
                journal.record(
                    self._conn_(),
                    self._ser._namespace,
                    h.key,
                    h.idempotency_key,
                    writer_text(h.writer),
                )
            )
            h.seq, h.duplicate = entry.seq, entry.duplicate

    async def _begin(self) -> int | None:
        """BEGIN (and the lock); a connection found dead here is replaced once.

        A connection can die while it sits idle in the pool or parked (a
        server restart, an idle timeout, an operator's pg_terminate_backend).
        Nothing of the write has run yet, so a fresh connection costs nothing.
        """
        h, dialect = self._h, self._ser._dialect
        deadline = h._timer.when() if h._timer is not None else None
        try:
            return await self.call(dialect.begin(self._conn_(), h.key, deadline))
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.info("writeturn: a connection was dead at BEGIN; taking a fresh one (%s)", exc)
            await self._close()
            self._conn = None
            self._began = False  # the dead connection's transaction died with it
            await self._connect()
            self._began = True
            return await self.call(dialect.begin(self._conn_(), h.key, deadline))

    async def _connect(self, check_reason: bool = True) -> None:
        spare = self._ser._take_spare()
        if spare is not None:
            self._conn = spare
            if check_reason and self._h._reason is not None:
                raise asyncio.CancelledError
            return
        engine = self._ser._engine
        checkout = asyncio.ensure_future(AsyncConnection(engine).start())
        # Nothing has begun during a checkout, so a cancellation may simply stop it.
        if await settle(checkout, checkout.cancel):
            self._cancel_seen = True
        if checkout.cancelled():
            raise asyncio.CancelledError
        if checkout.exception() is not None:
            exc = checkout.exception()
            assert exc is not None
            url = self._ser._engine.url
            raise DatabaseUnreachable(
                f"cannot reach {redact(url)} for the write on key {self._h.key!r}: "
                f"{describe_error(exc, url)}; the write did not begin (WITHDRAWN)"
            ) from exc
        self._conn = checkout.result()
        if self._cancel_seen or (check_reason and self._h._reason is not None):
            raise asyncio.CancelledError

    def _conn_(self) -> AsyncConnection:
        assert self._conn is not None
        return self._conn

    # -- the end of the write --------------------------------------------------

    async def _end(self, exc: BaseException | None) -> BaseException | None:
        """Commit or roll back, return the connection, hand the turn on; then
        return the exception the write ends with (None: it committed)."""
        h = self._h
        error = exc
        # Nothing began: the write never ran (unless an earlier attempt did).
        outcome = Outcome.ROLLED_BACK if h._attempts else Outcome.WITHDRAWN
        retry: RetryWrite | None = None
        try:
            if self._began:
                if exc is None and not self._cancel_seen and h._reason is None:
                    outcome, error = await self._commit()
                else:
                    outcome = Outcome.ROLLED_BACK
                    h._state = State.ENDING
                    await self._rollback()
            lost = self._lost(error)
            h._state = max(h._state, State.ENDING)
            if self._conn is not None:
                await self._close()
            cancelled = self._cancel_seen or isinstance(exc, asyncio.CancelledError)
            if not cancelled and h._reason is None:
                retry = self._retry_for(outcome, error)
        finally:
            if retry is None:
                self._release()
                h._set_outcome(outcome)
                if outcome is not Outcome.COMMITTED:
                    h.seq, h.duplicate = None, False
        if retry is not None:
            # The turn (and SQLite's gate) stay with this write: it keeps its place.
            self._gate_held = False
            return retry
        if cancelled or h._reason is not None:
            return h._cancellation(error, self._task, self._entry_cancelling)
        if lost and error is not None and not isinstance(error, OutcomeUnknown):
            return self._connection_lost(outcome, error)
        return error

    def _lost(self, error: BaseException | None) -> bool:
        """Whether the write's connection died (read before the connection is returned)."""
        if self._conn is not None and self._conn.invalidated:
            return True
        return isinstance(error, DBAPIError) and bool(error.connection_invalidated)

    def _connection_lost(self, outcome: Outcome, error: BaseException) -> ConnectionLost:
        cause = describe_error(error, self._ser._engine.url)
        err = ConnectionLost(
            f"the connection to the database was lost during the write on key "
            f"{self._h.key!r}; outcome {outcome.value}: {cause}"
        )
        err.__cause__ = error
        return err

    def _retry_for(self, outcome: Outcome, error: BaseException | None) -> RetryWrite | None:
        """A retry of this write if ``error`` is transient and it has retries left.

        A write whose COMMIT outcome is unknown is retried only with an
        idempotency key: the journal then applies it at most once.
        """
        h, ser = self._h, self._ser
        if error is None or h._fn is None or h._attempts >= h._retries:
            return None
        if outcome is Outcome.UNKNOWN:
            if h.idempotency_key is None:
                return None
            transient = True
        else:
            transient = outcome is Outcome.ROLLED_BACK and ser._dialect.is_transient(error)
        if not transient:
            return None
        h._attempts += 1
        delay = ser._retry_backoff * 2 ** (h._attempts - 1)
        log.info(
            "writeturn: retrying the write on key %r (attempt %d of %d) in %.3fs after %s",
            h.key,
            h._attempts,
            h._retries,
            delay,
            type(error).__name__,
        )
        ser._counters.retries += 1
        return RetryWrite(delay * random.uniform(0.5, 1.5), error)

    async def _commit(self) -> tuple[Outcome, BaseException | None]:
        session, conn = self._session, self._conn_()
        try:
            # Pending ORM changes are still the write function's work: a
            # failure or cancellation while flushing rolls the write back.
            if session is not None and (session.new or session.dirty or session.deleted):
                await self.call(AsyncSession.flush(session))
        except BaseException as exc:
            self._h._state = State.ENDING
            await self._rollback()
            return Outcome.ROLLED_BACK, exc
        if self._cancel_seen or self._h._reason is not None:
            self._h._state = State.ENDING
            await self._rollback()
            return Outcome.ROLLED_BACK, None
        self._h._state = State.COMMITTING
        self._h._disarm()
        try:
            await self.call(conn.commit(), interruptible=False)
        except Exception as exc:
            return await self._commit_failed(exc)
        return Outcome.COMMITTED, None

    async def _commit_failed(self, exc: Exception) -> tuple[Outcome, BaseException | None]:
        conn = self._conn_()
        ser = self._ser
        lost = conn.invalidated or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        if ser._dialect.not_sent(exc):
            # The driver refused COMMIT before sending it: the server never
            # committed, and rolls back when the dead connection is gone.
            await self._rollback()
            return Outcome.ROLLED_BACK, exc
        if not lost and isinstance(exc, DBAPIError):
            # An ordinary error at COMMIT (serialization failure, deferred
            # constraint): the database rolled the transaction back.
            await self._rollback()
            return Outcome.ROLLED_BACK, exc
        outcome = await self.call(
            ser._dialect.commit_outcome(ser._engine, self._xid), interruptible=False
        )
        if outcome is Outcome.UNKNOWN and self._h.idempotency_key is not None:
            outcome = await self.call(self._outcome_from_journal(), interruptible=False)
        if outcome is Outcome.COMMITTED:
            log.info("writeturn: COMMIT on key %r lost its connection but had landed", self._h.key)
            return outcome, None
        if outcome is Outcome.ROLLED_BACK:
            return outcome, exc
        err = OutcomeUnknown(
            f"the connection died while COMMIT of the write on key {self._h.key!r} was in flight "
            "and its fate could not be learned; check the database before retrying, or give "
            "writes an idempotency key"
        )
        err.__cause__ = exc
        return Outcome.UNKNOWN, err

    async def _outcome_from_journal(self) -> Outcome:
        """Learn whether the write landed from its journal row, on a new connection.

        The probe runs under the key's lock (SQLite: BEGIN IMMEDIATE) and waits
        for any transaction still holding the idempotency key, so a COMMIT
        that is still finishing on the server is not misread as lost.
        """
        ser, h = self._ser, self._h
        assert h.idempotency_key is not None
        try:
            async with ser._engine.connect() as conn:
                await ser._dialect.begin(conn, h.key)
                committed = await journal.probe(conn, ser._namespace, h.idempotency_key)
                await conn.rollback()
        except Exception as exc:
            log.warning("writeturn: could not read the journal to learn an outcome: %r", exc)
            return Outcome.UNKNOWN
        return Outcome.COMMITTED if committed else Outcome.ROLLED_BACK

    async def _rollback(self) -> None:
        conn = self._conn_()
        if conn.invalidated:
            return
        self._arm_terminate()  # a ROLLBACK is bounded by cleanup_timeout too
        try:
            await self.call(conn.rollback(), interruptible=False)
        except Exception as exc:
            log.warning("writeturn: ROLLBACK failed (%r); discarding the connection", exc)
            try:
                await self.call(conn.invalidate(), interruptible=False)
            except Exception:
                pass
        finally:
            self._disarm_terminate()

    async def _close(self) -> None:
        conn = self._conn_()
        self._drop_session()
        if conn.invalidated:
            self._ser._counters.connections_invalidated += 1
            self._ser._drop_spares()
        elif self._ser._park(conn):
            return  # kept for the next write: no pool round trip
        try:
            await self.call(conn.close(), interruptible=False)
        except Exception as exc:
            log.warning("writeturn: returning a connection failed (%r)", exc)

    def _drop_session(self) -> None:
        """Detach what the write loaded; the transaction itself has already ended.

        The session never owned the connection (``rollback_only``), so there is
        nothing to send: dropping it costs no round trip.
        """
        if self._session is not None:
            self._session.expunge_all()
            self._session = None

    def _release(self) -> None:
        ser = self._ser
        if self._gate_held:
            assert ser._gate is not None
            ser._gate.release(GATE_KEY)
            self._gate_held = False
        ser._turns.release(self._h.key)


def writer_text(writer: object) -> str | None:
    """A writer as the journal stores it."""
    return None if writer is None else str(writer)
