"""What became of a transaction's COMMIT: what the database did, never a guess.

Before COMMIT, :meth:`CommitOutcome.aborted` finds a transaction that Postgres
aborted because a statement failed inside the write and the function caught
the error (COMMIT would then roll back without a word). When COMMIT raises,
:meth:`CommitOutcome.refused` tells whether the database certainly did not
commit (the driver never sent it, or the database answered with an error on a
live connection); if not, the connection died with COMMIT in flight, and
:meth:`CommitOutcome.learn` asks the database, on a fresh connection: first by
the transaction's id, then, if that cannot tell, by a journal row this
transaction inserted (:func:`own_row`). A write that is a duplicate ran
nothing, and is COMMITTED whatever became of the transaction that found it
(:func:`own_outcome`).

# Invariants:
# - COMMITTED only if the database confirmed COMMIT, or showed afterwards
#   (by the transaction's id or its own journal row) that it landed;
# - ROLLED_BACK only if COMMIT certainly did not land: refused, aborted, or
#   shown afterwards not to have landed; else UNKNOWN, with OutcomeUnknown;
# - the journal is asked only about a row this transaction inserted, never a
#   duplicate's (an earlier transaction committed that one);
# - the writes of one transaction share its outcome, except a duplicate,
#   which is COMMITTED.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import _owned, journal
from ._calls import Calls
from ._error_kinds import ErrorKind, classify
from ._write import WriteRecord
from .dialects import Dialect, TransactionId
from .errors import OutcomeUnknown, TransactionAborted, TransactionOwnedError
from .outcome import Outcome
from .urls import describe_error

__all__ = ["CommitOutcome", "JournalRow", "own_outcome", "own_row"]

log = logging.getLogger("writeturn")

#: A journal row a transaction inserted: (idempotency key, seq).
JournalRow = tuple[str, int]


class CommitOutcome:
    """Learns the outcome of one transaction's COMMIT for the write(s) holding ``key``'s turn."""

    __slots__ = ("_calls", "_engine", "_dialect", "_namespace", "_key")

    def __init__(
        self, calls: Calls, engine: AsyncEngine, dialect: Dialect, namespace: str, key: str
    ) -> None:
        self._calls = calls
        self._engine = engine
        self._dialect = dialect
        self._namespace = namespace  # the journal's
        self._key = key

    async def aborted(self, conn: AsyncConnection) -> TransactionAborted | None:
        """The error of a transaction the database aborted after a statement failed in it
        and its error was caught, or None if COMMIT may go out (see the module docstring)."""
        first = _owned.failed(conn)
        if first is None or not self._dialect.aborts_on_error:
            return None
        # A statement failed and nobody raised: is the transaction still alive
        # (the failure was rolled back to a savepoint), or aborted?
        try:
            await self._calls.call(conn.exec_driver_sql("SELECT 1"), interruptible=False)
        except DBAPIError as exc:
            if ErrorKind.LOST in classify(self._dialect.name, exc):
                return None  # COMMIT will find the connection dead and say so
            # ABORTED, or an error that leaves the transaction as unable to commit.
            err = TransactionAborted(
                f"a statement failed inside the write on key {self._key!r} and its error was "
                f"caught ({describe_error(first, self._engine.url)}); the database aborted "
                "the transaction, so nothing of the write was committed (ROLLED_BACK). Let the "
                "error propagate, or run the statement that may fail inside "
                "`async with session.begin_nested():` so that only it is rolled back"
            )
            err.__cause__ = first
            return err
        return None

    def refused(self, conn: AsyncConnection, exc: Exception) -> bool:
        """Whether COMMIT on ``conn``, which raised ``exc``, certainly did not commit: the
        transaction is to be rolled back, and ends ROLLED_BACK with ``exc``."""
        if isinstance(exc, TransactionOwnedError):
            return True
        kind = classify(self._dialect.name, exc)
        if ErrorKind.NOT_SENT in kind:
            # The driver refused COMMIT before sending it: the server never
            # committed, and rolls back when the dead connection is gone.
            return True
        lost = conn.invalidated or ErrorKind.LOST in kind
        # An ordinary error at COMMIT (serialization failure, deferred
        # constraint): the database rolled the transaction back.
        return not lost and isinstance(exc, DBAPIError)

    async def learn(
        self, exc: Exception, xid: TransactionId | None, own_row: JournalRow | None
    ) -> tuple[Outcome, BaseException | None]:
        """The outcome of a COMMIT that raised ``exc`` and was not :meth:`refused` (the
        connection died with it in flight), and the error the transaction ends with.

        Asked on a fresh connection: by the transaction id ``xid``, then, if that
        cannot tell, by ``own_row``, a journal row the transaction inserted.
        """
        calls = self._calls
        outcome = await calls.call(
            self._dialect.commit_outcome(self._engine, xid), interruptible=False
        )
        if outcome is Outcome.UNKNOWN and own_row is not None:
            outcome = await calls.call(self._from_journal(own_row), interruptible=False)
        if outcome is Outcome.COMMITTED:
            log.info("writeturn: COMMIT on key %r lost its connection but had landed", self._key)
            return outcome, None
        if outcome is Outcome.ROLLED_BACK:
            return outcome, exc
        err = OutcomeUnknown(
            f"the connection died while COMMIT of the write on key {self._key!r} was in flight "
            "and its fate could not be learned; check the database before retrying, or give "
            "writes an idempotency key"
        )
        err.__cause__ = exc
        return Outcome.UNKNOWN, err

    async def _from_journal(self, own_row: JournalRow) -> Outcome:
        """Learn whether the transaction landed from a journal row it inserted, on a new
        connection: committed iff the idempotency key's row is there with that row's seq.

        The probe runs under the key's lock (SQLite: BEGIN IMMEDIATE) and waits
        for any transaction still holding the idempotency key, so a COMMIT
        that is still finishing on the server is not misread as lost.
        """
        dialect = self._dialect
        idempotency_key, seq = own_row
        try:
            async with self._engine.connect() as conn:
                if dialect.probe_isolation is not None:
                    # A fresh snapshot for each statement: the row it waited for is seen.
                    await conn.execution_options(isolation_level=dialect.probe_isolation)
                try:
                    await dialect.begin(conn, self._key)
                    committed = await journal.probe(conn, self._namespace, idempotency_key, seq)
                    await conn.rollback()
                finally:
                    if not conn.invalidated:
                        await dialect.release(conn)
        except Exception as exc:
            log.warning("writeturn: could not read the journal to learn an outcome: %r", exc)
            return Outcome.UNKNOWN
        return Outcome.COMMITTED if committed else Outcome.ROLLED_BACK


def own_row(records: Iterable[WriteRecord]) -> JournalRow | None:
    """A journal row the transaction of ``records`` inserted, to learn its outcome by.

    Only a write that is not a duplicate inserted one; a duplicate's row was
    committed by an earlier transaction and says nothing about this one. The
    writes of one transaction share its fate, so any one such row will do.
    """
    for record in records:
        if record.idempotency_key is not None and record.seq is not None and not record.duplicate:
            return record.idempotency_key, record.seq
    return None


def own_outcome(
    record: WriteRecord, outcome: Outcome, error: BaseException | None
) -> tuple[Outcome, BaseException | None]:
    """The outcome of ``record`` itself, given its transaction's.

    A duplicate ran nothing: its transaction found the row of the earlier write
    with its idempotency key, already committed, so it is COMMITTED whatever
    became of the transaction that looked.
    """
    if record.duplicate and outcome is not Outcome.COMMITTED:
        return Outcome.COMMITTED, None
    return outcome, error
