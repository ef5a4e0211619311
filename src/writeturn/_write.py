"""One write's life as a state machine: the only place a write's state and outcome change.

Every event that can happen to a write enters through :class:`WriteRecord`:
its turn is granted (:meth:`~WriteRecord.on_grant`), it is stopped by a
cancel, its timeout or ``close(drain=False)`` (:meth:`~WriteRecord.request_stop`),
its runner moves it on (:meth:`~WriteRecord.move`), and it ends
(:meth:`~WriteRecord.conclude`, which picks the exception the write raises, and
:meth:`~WriteRecord.settle`). The runners (a single write's worker, a batch,
a ``transaction()`` block) drive it; they never write its fields.

The states and the moves allowed between them::

    QUEUED ──grant──> GRANTED ──BEGIN──> RUNNING ──COMMIT sent──> COMMITTING ──┐
      │                 │                 │  │ ▲                     │          │
      │                 │                 │  │ └──rerun── RAN (batch)│          │
      │                 │                 │  └──ROLLBACK──> ROLLING_BACK        │
      │                 │                 │                    │     │          │
      │                 │                 │      RETRY_WAIT <──┴─────┘          │
      │                 │                 │      │  (back to RUNNING)           │
      └─────withdrawn───┴──────────────── ┴──────┴──────────────────────> DONE <┘

A stop is acted on at once where nothing of the write can be half-done
(QUEUED: withdrawn; GRANTED and RETRY_WAIT: its runner ends it; RUNNING: its
runner interrupts it between statements), and only noted where the database
is already deciding (RAN, COMMITTING, ROLLING_BACK): the write ends as the
database says, and the noted stop shapes only the exception it raises.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from .errors import SerializerClosed, TurnTimeout
from .outcome import Outcome
from .stats import Counters
from .turnlock import Waiter

__all__ = ["State", "Stop", "TRANSITIONS", "WriteRecord", "Owner", "Runner"]


class State(enum.Enum):
    QUEUED = "queued"  # in line for its key's turn
    GRANTED = "granted"  # its turn came (or a batch claimed it); no transaction yet
    RUNNING = "running"  # its transaction is open, before COMMIT is sent
    RAN = "ran"  # in a batch: its function returned; it waits for the shared COMMIT
    ROLLING_BACK = "rolling_back"  # ROLLBACK sent (or the connection is being discarded)
    COMMITTING = "committing"  # COMMIT sent: only the database decides now
    RETRY_WAIT = "retry_wait"  # rolled back after a transient error; runs again after a back-off
    DONE = "done"  # settled: its outcome is final


#: The moves a write may make. Two go backwards, on purpose: a retry runs the
#: write again (RETRY_WAIT -> RUNNING), and a batch rolled back for another
#: write's sake runs its other writes again (RAN -> GRANTED).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.GRANTED, State.DONE}),
    State.GRANTED: frozenset({State.RUNNING, State.DONE}),
    State.RUNNING: frozenset({State.RAN, State.COMMITTING, State.ROLLING_BACK}),
    State.RAN: frozenset({State.GRANTED, State.COMMITTING, State.DONE}),
    State.ROLLING_BACK: frozenset({State.RETRY_WAIT, State.DONE}),
    State.COMMITTING: frozenset({State.RETRY_WAIT, State.DONE}),
    State.RETRY_WAIT: frozenset({State.RUNNING, State.DONE}),
    State.DONE: frozenset(),
}

#: States in which a stop is acted on by the write's runner.
_ACTIONABLE = frozenset({State.GRANTED, State.RUNNING, State.RETRY_WAIT})


class Stop(enum.Enum):
    """Why a write was stopped from outside its function (the first reason wins)."""

    CANCEL = "cancel"  # handle.cancel(), or the task awaiting it was cancelled
    TIMEOUT = "timeout"  # its own timeout expired
    CLOSE = "close"  # close(drain=False), or close()'s timeout ran out


class Owner(Protocol):
    """What a write needs from the serializer that queued it (a narrow interface upwards)."""

    def withdraw(self, record: WriteRecord) -> bool:
        """Take a queued write out of line; False if it was granted meanwhile."""
        ...

    def release(self, key: str) -> None:
        """Hand the turn on ``key`` to the next write in line."""
        ...

    def running(self, record: WriteRecord) -> None:
        """The write left its line to run (its turn came, or a batch claimed it)."""
        ...

    def forget(self, record: WriteRecord) -> None:
        """The write settled: it no longer counts as live."""
        ...

    @property
    def counters(self) -> Counters:
        """Where the write reports its waits, holds, stops and outcome."""
        ...

    @property
    def journal_all(self) -> bool:
        """Every write is journaled (the serializer's ``journal=True``)."""
        ...


class Runner(Protocol):
    """Whoever runs a granted write: told when a stop must be acted on."""

    def stop(self, record: WriteRecord) -> None:
        """``record`` (GRANTED, RUNNING or RETRY_WAIT) was stopped: end it as soon as is safe."""
        ...


class WriteRecord(Waiter):
    """The record of one write: its place in line, its state and its outcome.

    # Invariants:
    # - ``state`` changes only through move()/settle(), along TRANSITIONS;
    # - ``outcome`` is PENDING until settle(), which runs once (an outcome is decided once);
    # - COMMITTED only from COMMITTING, i.e. after the server confirmed a COMMIT;
    # - ``holds_turn`` is True from the grant of the key's own turn until its
    #   holder hands it on, exactly once (release_turn); a write a batch
    #   claimed never holds the turn itself; no write settles holding it;
    # - the turn is handed on after the transaction ended, except where the
    #   database's lock holds the next write until then (Dialect.lock_orders_next):
    #   there a write that cannot run again hands it on as its COMMIT goes out;
    # - the timer is disarmed at settle(): no timer outlives its write.
    """

    __slots__ = (
        "key",
        "fn",
        "args",
        "kwargs",
        "context",
        "timeout",
        "idempotency_key",
        "retries",
        "attempts",
        "began",
        "_journal",
        "state",
        "outcome",
        "stop",
        "cancelled",
        "_ending",
        "holds_turn",
        "runner",
        "_owner",
        "_since",
        "_timer",
        "_on_grant",
        "_waiters",
    )

    def __init__(
        self,
        owner: Owner,
        key: str,
        writer: Hashable | None,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        retries: int = 0,
        context: contextvars.Context | None = None,
    ) -> None:
        super().__init__(writer)
        self.key = key
        self.fn = fn  # None for a transaction() block: the caller's code is the function
        self.args = args
        self.kwargs = kwargs
        self.context = context  # the submitter's, copied: the function runs in it
        self.timeout = timeout
        self.idempotency_key = idempotency_key
        self.retries = retries  # how many times a transient failure may be retried
        self.attempts = 0  # retries made so far
        self.began = False  # its transaction began at least once (its function may have run)
        self._journal: tuple[int, bool] | None = None  # (seq, duplicate), see journaled_as()
        self.state = State.QUEUED
        self.outcome = Outcome.PENDING
        self.stop: Stop | None = None
        self.cancelled = False  # a caller's cancellation arrived (raised even after a COMMIT)
        self._ending: tuple[Any, BaseException | None] | None = None  # set by settle()
        self.holds_turn = False
        self.runner: Runner | None = None
        self._owner = owner
        self._since = time.monotonic()  # queued at; from the grant on, granted at
        self._timer: asyncio.TimerHandle | None = None
        self._on_grant: Callable[[WriteRecord], None] | None = None
        # Made on the first await: most queued writes are awaited only once they run,
        # and an empty list per queued write is a seventh of its memory.
        self._waiters: list[asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        state = self.outcome.value if self.state is State.DONE else self.state.value
        return f"<write key={self.key!r} writer={self.writer!r} {state}>"

    # -- derived fields (each would cost every queued write a slot) ------------

    @property
    def deadline(self) -> float | None:
        """Event-loop time its timeout expires; None without one, or once it has."""
        timer = self._timer
        return None if timer is None else timer.when()

    @property
    def journaled(self) -> bool:
        """It gets a journal row: it has an idempotency key, or every write does."""
        return self.idempotency_key is not None or self._owner.journal_all

    @property
    def seq(self) -> int | None:
        """Its journal sequence number, once journaled (None if it did not commit)."""
        journal = self._journal
        return None if journal is None else journal[0]

    @property
    def duplicate(self) -> bool:
        """An earlier write with its idempotency key had committed: its function did not run."""
        journal = self._journal
        return journal is not None and journal[1]

    @property
    def result(self) -> Any:
        """What its function returned, once settled COMMITTED (else None)."""
        ending = self._ending
        return None if ending is None else ending[0]

    @property
    def exception(self) -> BaseException | None:
        """What awaiting it raises, once settled (None: it returns ``result``)."""
        ending = self._ending
        return None if ending is None else ending[1]

    # -- events ----------------------------------------------------------------

    def arm(self, on_grant: Callable[[WriteRecord], None]) -> None:
        """About to be queued: remember what to do on the grant, start the timeout."""
        self._on_grant = on_grant
        if self.timeout is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.timeout, self._expire)

    def on_grant(self) -> None:
        """The key's turn is this write's now (called by the turn lock, synchronously)."""
        self.holds_turn = True
        self.granted()
        assert self._on_grant is not None
        self._on_grant(self)

    def granted(self) -> None:
        """The write may run: its own turn came, or a batch holding the turn claimed it."""
        now = time.monotonic()
        self._owner.counters.waits.append(now - self._since)
        self._since = now
        self.move(State.GRANTED)
        self._owner.running(self)

    def run_by(self, runner: Runner) -> None:
        """``runner`` runs the write from now on: it is told of a stop (see Runner)."""
        self.runner = runner

    def journaled_as(self, seq: int, duplicate: bool) -> None:
        """Its journal row: ``seq``, and whether an earlier write with its idempotency key
        had committed already (a duplicate, whose function does not run)."""
        self._journal = (seq, duplicate)

    def count_attempt(self) -> int:
        """Another attempt is to be made after a transient failure; the count so far."""
        self.attempts += 1
        return self.attempts

    def release_turn(self) -> None:
        """Hand the key's turn on; only the write holding it may, and only once."""
        assert self.holds_turn, f"{self!r} hands on a turn it does not hold"
        self.holds_turn = False
        self._owner.release(self.key)

    def transfer_turn(self) -> None:
        """The turn now belongs to the batch that runs this write, which hands it on."""
        assert self.holds_turn
        self.holds_turn = False

    def move(self, to: State) -> None:
        assert to in TRANSITIONS[self.state], f"{self!r}: {self.state.name} -> {to.name}"
        if to is State.RUNNING:
            self.began = True
        self.state = to

    @property
    def unbegun_outcome(self) -> Outcome:
        """How the write ends if it stops now, outside a transaction: WITHDRAWN if its
        function never ran, else ROLLED_BACK (an earlier attempt was rolled back)."""
        return Outcome.ROLLED_BACK if self.began else Outcome.WITHDRAWN

    def request_stop(self, reason: Stop) -> bool:
        """Stop the write (cancel, timeout, close); False if it has already settled."""
        state = self.state
        if state is State.DONE:
            return False
        self._owner.counters.cancel_requests += 1
        if reason is Stop.CANCEL:
            self.cancelled = True
        if self.stop is None:
            self.stop = reason
        if state is State.QUEUED:
            withdrawn = self._owner.withdraw(self)
            assert withdrawn, f"{self!r} was queued but not in line"
            self.settle(Outcome.WITHDRAWN, exception=self.stop_exception(Outcome.WITHDRAWN))
        elif state in _ACTIONABLE and self.runner is not None:
            self.runner.stop(self)
        # RAN, COMMITTING, ROLLING_BACK: noted; the database decides the outcome.
        return True

    def _expire(self) -> None:
        self._timer = None
        self.request_stop(Stop.TIMEOUT)

    # -- the end ---------------------------------------------------------------

    def conclude(
        self, outcome: Outcome, result: Any = None, error: BaseException | None = None
    ) -> None:
        """Settle after the write's transaction ended, choosing what awaiting it raises.

        COMMITTED: the function's result, or ``CancelledError`` if a caller
        cancelled meanwhile (the commit stands; a noted timeout or close is
        moot). Otherwise, if the write was stopped: TurnTimeout,
        SerializerClosed or ``CancelledError``, caused by ``error``; else ``error``.
        """
        if outcome is Outcome.COMMITTED:
            exc: BaseException | None = asyncio.CancelledError() if self.cancelled else None
        elif self.stop is not None:
            exc = self.stop_exception(outcome)
            if error is not None and not isinstance(error, asyncio.CancelledError):
                exc.__cause__ = error
        else:
            exc, result = error, None
        self.settle(outcome, result, exc)

    def settle(
        self, outcome: Outcome, result: Any = None, exception: BaseException | None = None
    ) -> None:
        """Give the write its final outcome and wake everyone waiting for it."""
        assert self.state is not State.DONE, "an outcome is decided once"
        assert outcome is not Outcome.PENDING
        assert outcome is not Outcome.COMMITTED or self.state is State.COMMITTING, (
            "COMMITTED only after a confirmed COMMIT"
        )
        assert not self.holds_turn, f"{self!r} settles while holding its turn"
        if self.state is not State.QUEUED:
            self._owner.counters.holds.append(time.monotonic() - self._since)
        self.move(State.DONE)
        self.outcome = outcome
        self._owner.counters.by_outcome[outcome] += 1
        if outcome is not Outcome.COMMITTED:
            self._journal = None
        self._ending = (result, exception)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.fn = self.args = self.kwargs = self.context = None  # type: ignore[assignment]
        self.runner = self._on_grant = None
        waiters, self._waiters = self._waiters or (), None
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        self._owner.forget(self)

    def add_waiter(self, fut: asyncio.Future[None]) -> None:
        """Resolve ``fut`` when the write settles (at once if it has)."""
        if self.state is State.DONE:
            if not fut.done():
                fut.set_result(None)
        elif self._waiters is None:
            self._waiters = [fut]
        else:
            self._waiters.append(fut)

    def stop_exception(self, outcome: Outcome) -> BaseException:
        """The exception that reports why the write was stopped, ending with ``outcome``."""
        where = {State.QUEUED: "while queued", State.GRANTED: "before it began"}.get(
            self.state, "while running"
        )
        who = f"write on key {self.key!r} (writer {self.writer!r})"
        if self.stop is Stop.TIMEOUT:
            return TurnTimeout(
                f"{who} timed out after {self.timeout}s {where}; outcome {outcome.value}. "
                "Raise its timeout, or look at what holds the key: serializer.key_statistics(key)"
            )
        if self.stop is Stop.CLOSE:
            return SerializerClosed(
                f"{who} was stopped {where} by close() (drain=False, or its timeout ran out); "
                f"outcome {outcome.value}"
            )
        return asyncio.CancelledError()
