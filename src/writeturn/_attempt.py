"""One attempt at a key's writes: the steps every runner takes, in one order, each
ending the same way.

A submitted write, a batch and a ``transaction()`` block each run attempts of
the same shape on a :class:`~writeturn._transaction.Transaction`::

    open(record)        connect, RUNNING, BEGIN with the key's lock   (a batch: connect, begin)
    run(record, ...)    the journal row, the write's function, the flush
    commit(records)     COMMITTING, COMMIT, its outcome learnt, each write's own
    abandon(record, e)  ROLLBACK if the write began, the error explained

and then ``finish()`` hands the connection back, before the runner's
:class:`~writeturn._turn.TurnHold` hands the turn on and the writes settle.
What a runner keeps of its own is only where it differs: a batch runs several
writes between BEGIN and COMMIT, a block's function is the caller's code
between ``__aenter__`` and ``__aexit__``, a single write passes its turn on
early as its COMMIT goes out.

# Invariants:
# - a record moves RUNNING before BEGIN is sent, so a cut-off BEGIN rolls back;
# - the journal row is written in the transaction before the function runs;
# - ``journaled`` is set only once this attempt's journal row was written:
#   it then tells whether an earlier attempt's lost COMMIT landed;
# - commit() gives every record of the transaction its outcome, never half.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ._commit_outcome import own_outcome, own_row
from ._session import WriteSession
from ._transaction import Transaction
from ._write import State, WriteRecord
from .errors import ConfigurationError
from .outcome import Outcome

__all__ = ["Attempt"]


class Attempt:
    """One attempt's steps on ``txn`` (see the module docstring for their order)."""

    __slots__ = ("txn", "journaled")

    def __init__(self, txn: Transaction) -> None:
        self.txn = txn
        #: This attempt wrote its write's journal row (an idempotency key's).
        self.journaled = False

    async def open(self, record: WriteRecord) -> WriteSession:
        """Connect and BEGIN for ``record`` alone; the session its function gets."""
        txn = self.txn
        if record.stop is not None or txn.stopped:
            raise asyncio.CancelledError  # stopped while it waited for the gate
        await txn.connect()
        record.move(State.RUNNING)
        await txn.begin(record.deadline)
        return txn.session()

    async def connect(self) -> None:
        """A batch's connection: a stop of a write of its previous attempt no longer applies."""
        await self.txn.connect()
        self.txn.resume()

    async def begin(self, deadline: float | None) -> None:
        """A batch's BEGIN; its writes move RUNNING one by one as their functions run."""
        await self.txn.begin(deadline)

    async def journal(self, record: WriteRecord) -> None:
        """Write ``record``'s journal row (if it has one) in this transaction."""
        await self.txn.record_journal(record)
        if record.idempotency_key is not None:
            self.journaled = True

    async def run(self, record: WriteRecord, session: WriteSession) -> Any:
        """The journal row, the write's function and the flush; raises if it was stopped."""
        txn = self.txn
        await self.journal(record)
        result = await _call_function(record, session)
        # Flushed now, so that a failing statement is this write's failure.
        await txn.flush()
        if txn.stopped:
            raise asyncio.CancelledError
        return result

    async def abandon(
        self, record: WriteRecord, exc: BaseException
    ) -> tuple[Outcome, BaseException | None]:
        """``record``'s attempt failed with ``exc`` before COMMIT: roll back if it began.

        Returns its outcome and the error it ends with: WITHDRAWN (or ROLLED_BACK
        after an earlier attempt) with ``exc`` if nothing began, else ROLLED_BACK
        with ``exc`` explained (a lost connection becomes ConnectionLost).
        """
        if record.state is not State.RUNNING:
            return record.unbegun_outcome, exc
        record.move(State.ROLLING_BACK)
        await self.txn.rollback()
        return Outcome.ROLLED_BACK, self.txn.explain(Outcome.ROLLED_BACK, exc)

    async def commit(
        self, records: Sequence[WriteRecord]
    ) -> list[tuple[Outcome, BaseException | None]]:
        """COMMIT the transaction of ``records``; each one's outcome and error.

        The writes share one fate: a journal row one of them inserted tells a
        lost COMMIT's outcome (a duplicate's row is an earlier transaction's),
        and a duplicate is COMMITTED whatever became of this transaction.
        """
        txn = self.txn
        for record in records:
            record.move(State.COMMITTING)
        shared, error = await txn.commit(own_row(records))
        error = txn.explain(shared, error)
        return [own_outcome(record, shared, error) for record in records]


async def _call_function(record: WriteRecord, session: WriteSession) -> Any:
    """Run the write's function on ``session`` (None for a duplicate: it ran once already)."""
    if record.duplicate:
        return None
    fn = record.fn
    assert fn is not None, "a transaction() block has no function"
    pending = fn(session, *record.args, **(record.kwargs or {}))
    if not asyncio.iscoroutine(pending) and not hasattr(pending, "__await__"):
        name = getattr(fn, "__qualname__", None) or repr(fn)
        raise ConfigurationError(
            f"the write function {name} returned {type(pending).__name__}, not an "
            "awaitable; it must be an `async def` taking the session first"
        )
    return await pending
