"""The handle a caller awaits: a thin public face over one write's record."""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Hashable
from typing import Any, Generic, TypeVar

from ._write import State, Stop, WriteRecord
from .outcome import Outcome

__all__ = ["WriteHandle"]

T = TypeVar("T")


class _Settled(asyncio.Future[None]):
    """Resolved when a write settles. Its awaiters cannot cancel it: cancelling an
    awaiting task asks for the write to be cancelled instead, and asyncio raises
    ``CancelledError`` in that task once the write has settled."""

    def __init__(self, record: WriteRecord) -> None:
        super().__init__()
        self._writeturn_record = record

    def cancel(self, msg: Any | None = None) -> bool:
        self._writeturn_record.request_stop(Stop.CANCEL)
        return False


class WriteHandle(Generic[T]):
    """A submitted write: ``await`` it for the function's result; ``outcome`` never lies.

    ``outcome`` is ``PENDING`` until the write is done, then ``COMMITTED`` if
    and only if its effects are in the database. Awaiting returns the write
    function's result, or raises what ended the write: the function's own
    exception, ``CancelledError``, :class:`TurnTimeout`,
    :class:`SerializerClosed`, :class:`ConnectionLost` or :class:`OutcomeUnknown`.
    If the task awaiting the handle is cancelled, the write is cancelled too;
    the await returns (raising ``CancelledError``) only once the write has settled.
    """

    __slots__ = ("_record", "__weakref__")

    def __init__(self, record: WriteRecord) -> None:
        self._record = record

    @property
    def key(self) -> str:
        return self._record.key

    @property
    def writer(self) -> Hashable | None:
        return self._record.writer

    @property
    def idempotency_key(self) -> str | None:
        """The caller's idempotency key (None: none); see :meth:`WriteSerializer.submit`."""
        return self._record.idempotency_key

    @property
    def seq(self) -> int | None:
        """For a journaled write that committed: its gap-free sequence number on its key."""
        return self._record.seq

    @property
    def duplicate(self) -> bool:
        """True if an earlier write with the same idempotency key had already committed,
        so this one did not run its function (outcome COMMITTED)."""
        return self._record.duplicate

    @property
    def outcome(self) -> Outcome:
        """PENDING until done; then COMMITTED, ROLLED_BACK, WITHDRAWN or UNKNOWN."""
        return self._record.outcome

    @property
    def queued(self) -> bool:
        """True while the write waits in line for its turn."""
        return self._record.state is State.QUEUED

    def done(self) -> bool:
        """True once the write has settled and its outcome is final."""
        return self._record.state is State.DONE

    def cancel(self) -> bool:
        """Ask for the write to be cancelled; return False if it is already done.

        Queued: it is withdrawn at once (WITHDRAWN). Running: it is rolled
        back (ROLLED_BACK). Committing: the commit finishes and the outcome
        says what happened. In every case awaiting the handle then raises
        ``CancelledError``.
        """
        return self._record.request_stop(Stop.CANCEL)

    def result(self) -> T:
        """The write function's result; raises what ended the write, or
        ``asyncio.InvalidStateError`` if it is not done yet."""
        record = self._record
        if record.state is not State.DONE:
            raise asyncio.InvalidStateError(f"{self!r} is not done; await it first")
        if record.exception is not None:
            raise record.exception
        return record.result  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        """What ended the write (None if it returned normally); it must be done."""
        if self._record.state is not State.DONE:
            raise asyncio.InvalidStateError(f"{self!r} is not done; await it first")
        return self._record.exception

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        record = self._record
        if record.state is not State.DONE:
            done = _Settled(record)
            record.add_waiter(done)
            # A cancellation of this task cancels the write and lands here once
            # the write has settled (see _Settled).
            await done
        return self.result()

    def __repr__(self) -> str:
        record = self._record
        state = record.outcome.value if record.state is State.DONE else record.state.value
        return f"<WriteHandle key={record.key!r} writer={record.writer!r} {state}>"
