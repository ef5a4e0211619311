"""One database transaction on one connection: begin, call, flush, commit, roll back, finish.

This is the small API that every way of running writes shares (a single
write, a batch, a ``transaction()`` block). It knows the connection, never a
write's record: the runners move their records' states around these calls.

It is made from the runtime, but keeps none of it: it builds its parts, each
from the few pieces of the runtime it uses, and keeps for itself only the
dialect, the journal's namespace and the key:

* :class:`~writeturn._calls.Calls`, the funnel every database call goes
  through so that no cancellation lands inside a statement (where a
  cancellation can land, and what happens, is told there);
* :class:`~writeturn._lease.Lease`, the connection from checkout to hand-back,
  and whether it was lost;
* :class:`~writeturn._commit_outcome.CommitOutcome`, what became of COMMIT
  when it failed or its connection died.

# Invariants:
# - ``began`` is set before BEGIN is sent, so a cut-off BEGIN is rolled back too;
# - the connection is owned (see _owned) from BEGIN until finish() hands it back;
# - every database call goes through the funnel (``Calls.call``), the write
#   function's statements too (through the session's gate);
# - a session it gave out is refused from finish() on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from . import _owned, journal
from ._calls import Calls, SessionGate
from ._commit_outcome import CommitOutcome, JournalRow
from ._error_kinds import ErrorKind, classify
from ._lease import Lease
from ._runtime import Runtime
from ._session import WriteSession
from ._write import WriteRecord
from .dialects import TransactionId
from .outcome import Outcome

__all__ = ["Transaction"]

log = logging.getLogger("writeturn")


class Transaction:
    """One transaction on one connection for the write(s) holding ``key``'s turn."""

    __slots__ = (
        "_dialect",
        "_namespace",
        "_key",
        "_calls",
        "_lease",
        "_outcome",
        "began",
        "_xid",
        "_session",
        "_sessions",
    )

    def __init__(
        self,
        rt: Runtime,
        key: str,
        *,
        owns_task: bool,
        on_cancel: Callable[[], object] | None = None,
        cancel_pending: Callable[[], bool] | None = None,
    ) -> None:
        opts = rt.options
        self._dialect = rt.dialect
        self._namespace = opts.namespace
        self._key = key
        self._calls = Calls(
            rt.dialect,
            rt.engine,
            rt.counters,
            key,
            cancel_grace=opts.cancel_grace,
            cleanup_timeout=opts.cleanup_timeout,
            owns_task=owns_task,
            on_cancel=on_cancel,
            cancel_pending=cancel_pending,
        )
        self._lease = Lease(
            self._calls, rt.engine, rt.dialect, rt.connections, rt.counters, rt.keep, key
        )
        self._outcome = CommitOutcome(self._calls, rt.engine, rt.dialect, opts.namespace, key)
        self.began = False
        self._xid: TransactionId | None = None
        self._session: WriteSession | None = None
        self._sessions: list[SessionGate] = []

    # -- stopping ------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """The write being run was stopped: no new statement starts."""
        return self._calls.stopped

    def stop(self) -> None:
        """The write being run was stopped: refuse new statements, and stop the one in
        flight after ``cancel_grace`` (never by cancelling into the driver)."""
        self._calls.stop()

    def resume(self) -> None:
        """A batch moves on to its next write: a stop of the previous one no longer applies."""
        self._calls.resume()

    # -- the steps of a transaction ------------------------------------------------------

    def connect(self) -> Coroutine[Any, Any, None]:
        """Take a live connection (see :meth:`~writeturn._lease.Lease.connect`)."""
        return self._lease.connect()  # its coroutine itself: no extra await on the way

    async def begin(self, deadline: float | None) -> None:
        """BEGIN (and the lock); a connection found dead here is replaced once.

        A connection can die while it sits idle in the pool or parked (a
        server restart, an idle timeout, an operator's pg_terminate_backend).
        Nothing of the write has run yet, so a fresh connection costs nothing.
        ``deadline`` (event-loop time) bounds a wait for another process's lock.
        """
        dialect = self._dialect
        self.began = True
        try:
            self._xid = await self._calls.call(dialect.begin(self._conn(), self._key, deadline))
        except DBAPIError as exc:
            if ErrorKind.LOST not in classify(dialect.name, exc):
                raise
            log.info("writeturn: a connection was dead at BEGIN; taking a fresh one (%s)", exc)
            self.began = False  # the dead connection's transaction died with it
            await self.connect()
            self.began = True
            self._xid = await self._calls.call(dialect.begin(self._conn(), self._key, deadline))
        _owned.own(self._conn())

    def session(self) -> WriteSession:
        """The session the write function gets; refused once this transaction has ended."""
        if self._session is None:
            gate = SessionGate(self._calls)
            self._sessions.append(gate)
            self._session = WriteSession(
                gate.call,
                bind=self._conn(),
                expire_on_commit=False,
                join_transaction_mode="rollback_only",
            )
        return self._session

    async def record_journal(self, record: WriteRecord) -> None:
        """Insert ``record``'s journal row in this transaction, if it is journaled."""
        if record.journaled:
            writer = None if record.writer is None else str(record.writer)
            entry = await self._calls.call(
                journal.record(
                    self._conn(), self._namespace, record.key, record.idempotency_key, writer
                )
            )
            record.journaled_as(entry.seq, entry.duplicate)

    async def flush(self) -> None:
        """Send the session's pending ORM changes: still the write function's work."""
        session = self._session
        if session is not None and (session.new or session.dirty or session.deleted):
            await self._calls.call(AsyncSession.flush(session))

    async def commit(self, own_row: JournalRow | None) -> tuple[Outcome, BaseException | None]:
        """COMMIT, and learn its outcome: what the database did, never a guess.

        ``own_row`` is a journal row this transaction inserted (see
        :func:`~writeturn._commit_outcome.own_row`): if the connection dies
        during COMMIT and the transaction id cannot tell, whether that row
        exists tells. A row some other transaction wrote (a duplicate's) tells
        nothing about this one and is never asked.

        On Postgres a statement that failed inside the write aborts the whole
        transaction, even if the function caught the error, and COMMIT then
        rolls back without an error: that is found out first and reported.
        """
        conn = self._conn()
        aborted = await self._outcome.aborted(conn)
        if aborted is not None:
            await self.rollback()
            return Outcome.ROLLED_BACK, aborted
        _owned.ending(conn)
        try:
            await self._calls.call(conn.commit(), interruptible=False)
        except Exception as exc:
            try:
                if self._outcome.refused(conn, exc):
                    await self.rollback()
                    return Outcome.ROLLED_BACK, exc
                return await self._outcome.learn(exc, self._xid, own_row)
            finally:
                self.began = False
        self.began = False
        return Outcome.COMMITTED, None

    async def rollback(self) -> None:
        """ROLLBACK, bounded by cleanup_timeout; a connection that fails it is discarded."""
        conn = self._lease.conn
        self._drop_session()
        if conn is None or conn.invalidated or not self.began:
            return
        _owned.ending(conn)
        self._calls.arm_terminate()
        try:
            await self._calls.call(conn.rollback(), interruptible=False)
            if self._dialect.driver_in_transaction(conn):
                # SQLAlchemy lost track of the transaction (a refused commit()
                # deactivates it), but the database still has it open.
                await self._calls.call(conn.run_sync(_rollback_driver), interruptible=False)
                if self._dialect.driver_in_transaction(conn):
                    raise RuntimeError("the connection is still inside a transaction")
        except Exception as exc:
            log.warning("writeturn: ROLLBACK failed (%r); discarding the connection", exc)
            try:
                await self._calls.call(conn.invalidate(), interruptible=False)
            except Exception:
                pass
        finally:
            self._calls.disarm_terminate()
            self.began = False

    def explain(self, outcome: Outcome, error: BaseException | None) -> BaseException | None:
        """The error a write ends with: a lost connection becomes
        :class:`~writeturn.errors.ConnectionLost` (read before finish(); see
        :meth:`~writeturn._lease.Lease.explain`)."""
        return self._lease.explain(outcome, error)

    async def finish(self) -> None:
        """End this transaction's use of the connection: park it or hand it back.

        The transaction itself has ended (COMMIT or ROLLBACK returned, or the
        connection died). The session is refused from now on.
        """
        self._drop_session()
        for gate in self._sessions:
            gate.open = False
        self._sessions.clear()
        if self._lease.conn is not None:
            await self._lease.hand_back()
        self.began = False

    def _drop_session(self) -> None:
        """Detach what the write loaded; the session never owned the connection
        (``rollback_only``), so dropping it sends nothing."""
        if self._session is not None:
            self._session.expunge_all()
            self._session = None

    def _conn(self) -> AsyncConnection:
        conn = self._lease.conn
        assert conn is not None
        return conn


def _rollback_driver(sync_conn: Any) -> None:
    sync_conn.connection.dbapi_connection.rollback()
