"""The write state machine on its own: every event in every state, then random event
sequences (hypothesis) against the invariants. No database: the record's owner is a
real TurnLock, its runner a recorder of stop requests."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from writeturn._write import TRANSITIONS, State, Stop, WriteRecord
from writeturn.errors import SerializerClosed, TurnTimeout
from writeturn.outcome import Outcome
from writeturn.stats import Counters
from writeturn.turnlock import TurnLock


class Owner:
    """The serializer's side of a record: a real turn lock and the set of live writes."""

    def __init__(self) -> None:
        self.turns = TurnLock()
        self.live: set[WriteRecord] = set()
        self.releases = 0
        self.counters = Counters()
        self.journal_all = False

    def withdraw(self, record: WriteRecord) -> bool:
        return self.turns.withdraw(record.key, record)

    def release(self, key: str) -> None:
        self.releases += 1
        self.turns.release(key)

    def running(self, record: WriteRecord) -> None:
        pass  # the live set below already holds it

    def forget(self, record: WriteRecord) -> None:
        self.live.discard(record)


class Runner:
    def __init__(self) -> None:
        self.stops: list[WriteRecord] = []

    def stop(self, record: WriteRecord) -> None:
        self.stops.append(record)


def new(owner: Owner, writer: str | None = "A", **kw: object) -> WriteRecord:
    record = WriteRecord(owner, "k", writer, lambda s: None, **kw)  # type: ignore[arg-type]
    owner.live.add(record)
    return record


def queue(owner: Owner, record: WriteRecord, granted: list[WriteRecord] | None = None) -> None:
    record.arm(granted.append if granted is not None else (lambda r: None))
    if owner.turns.enqueue(record.key, record):
        record.on_grant()


def in_state(state: State) -> tuple[Owner, WriteRecord, Runner]:
    """A record brought to ``state`` along allowed moves, holding its turn where it would."""
    owner, runner = Owner(), Runner()
    if state is State.QUEUED:
        queue(owner, new(owner, writer="B"))  # B holds the turn, so the record waits
    record = new(owner)
    record.runner = runner
    queue(owner, record)
    path = {
        State.QUEUED: [],
        State.GRANTED: [],
        State.RUNNING: [State.RUNNING],
        State.RAN: [State.RUNNING, State.RAN],
        State.ROLLING_BACK: [State.RUNNING, State.ROLLING_BACK],
        State.COMMITTING: [State.RUNNING, State.COMMITTING],
        State.RETRY_WAIT: [State.RUNNING, State.ROLLING_BACK, State.RETRY_WAIT],
        State.DONE: [State.RUNNING, State.ROLLING_BACK],
    }[state]
    for to in path:
        record.move(to)
    if state is State.DONE:
        record.release_turn()
        record.conclude(Outcome.ROLLED_BACK, None, RuntimeError("boom"))
    assert record.state is state
    return owner, record, runner


# -- the transition table -------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(State, State)))
def test_move_follows_the_transition_table(src: State, dst: State) -> None:
    record = new(Owner())
    record.state = src
    if dst in TRANSITIONS[src]:
        record.move(dst)
        assert record.state is dst
    else:
        with pytest.raises(AssertionError):
            record.move(dst)
        assert record.state is src


def test_every_state_but_done_can_reach_done() -> None:
    for state in State:
        seen, frontier = {state}, [state]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert State.DONE in seen, state


# -- a stop in every state ----------------------------------------------------------


@pytest.mark.parametrize("reason", list(Stop))
@pytest.mark.parametrize("state", list(State))
def test_a_stop_in_every_state(state: State, reason: Stop) -> None:
    owner, record, runner = in_state(state)
    before = record.outcome
    took = record.request_stop(reason)
    if state is State.DONE:
        assert took is False
        assert record.outcome is before and record.stop is None and runner.stops == []
        return
    assert took is True
    assert record.stop is reason
    assert record.cancelled is (reason is Stop.CANCEL)
    if state is State.QUEUED:
        # Withdrawn at once: settled, out of line, the holder undisturbed.
        assert record.state is State.DONE and record.outcome is Outcome.WITHDRAWN
        assert owner.turns.key_statistics("k").waiting == 0
        assert owner.turns.key_statistics("k").holder == "B"
        expected = {
            Stop.CANCEL: asyncio.CancelledError,
            Stop.TIMEOUT: TurnTimeout,
            Stop.CLOSE: SerializerClosed,
        }[reason]
        assert isinstance(record.exception, expected)
        assert record not in owner.live
        assert runner.stops == []
    elif state in (State.GRANTED, State.RUNNING, State.RETRY_WAIT):
        assert runner.stops == [record]  # its runner acts on it
        assert record.state is state and record.outcome is Outcome.PENDING
    else:  # RAN, COMMITTING, ROLLING_BACK: only noted
        assert runner.stops == []
        assert record.state is state and record.outcome is Outcome.PENDING


def test_the_first_reason_wins_and_a_cancel_is_always_remembered() -> None:
    _, record, runner = in_state(State.COMMITTING)
    record.request_stop(Stop.TIMEOUT)
    record.request_stop(Stop.CANCEL)
    assert runner.stops == []
    assert record.stop is Stop.TIMEOUT and record.cancelled


# -- settling ---------------------------------------------------------------------


def test_an_outcome_is_decided_once() -> None:
    _, record, _ = in_state(State.DONE)
    with pytest.raises(AssertionError, match="decided once"):
        record.settle(Outcome.COMMITTED)


@pytest.mark.parametrize("state", [State.RUNNING, State.RAN, State.ROLLING_BACK])
def test_committed_only_after_a_confirmed_commit(state: State) -> None:
    _, record, _ = in_state(state)
    record.release_turn()
    with pytest.raises(AssertionError):
        record.settle(Outcome.COMMITTED)


def test_no_write_settles_holding_its_turn() -> None:
    _, record, _ = in_state(State.ROLLING_BACK)
    with pytest.raises(AssertionError, match="holding its turn"):
        record.settle(Outcome.ROLLED_BACK)


def test_a_turn_is_handed_on_once() -> None:
    owner, record, _ = in_state(State.RUNNING)
    record.release_turn()
    with pytest.raises(AssertionError):
        record.release_turn()
    assert owner.releases == 1


def test_conclude_after_a_commit_reports_the_result_and_a_late_cancel() -> None:
    _, record, _ = in_state(State.COMMITTING)
    record.request_stop(Stop.TIMEOUT)  # moot: the commit stands
    record.release_turn()
    record.conclude(Outcome.COMMITTED, 42)
    assert record.outcome is Outcome.COMMITTED and record.result == 42
    assert record.exception is None

    _, record, _ = in_state(State.COMMITTING)
    record.request_stop(Stop.CANCEL)
    record.release_turn()
    record.conclude(Outcome.COMMITTED, 42)
    assert isinstance(record.exception, asyncio.CancelledError)


def test_conclude_after_a_stop_reports_the_stop_caused_by_the_error() -> None:
    _, record, _ = in_state(State.RUNNING)
    record.request_stop(Stop.TIMEOUT)
    record.move(State.ROLLING_BACK)
    record.release_turn()
    cause = RuntimeError("statement interrupted")
    record.conclude(Outcome.ROLLED_BACK, None, cause)
    assert isinstance(record.exception, TurnTimeout)
    assert record.exception.__cause__ is cause
    assert "while running" in str(record.exception) and "rolled_back" in str(record.exception)


async def test_the_timer_stops_the_write_and_never_outlives_it() -> None:
    owner = Owner()
    blocker = new(owner, writer="B")
    queue(owner, blocker)
    record = new(owner, timeout=0.01)
    record.arm(lambda r: None)
    assert owner.turns.enqueue("k", record) is False
    await asyncio.sleep(0.05)
    assert record.outcome is Outcome.WITHDRAWN and isinstance(record.exception, TurnTimeout)

    settled = new(owner, timeout=0.01)
    settled.arm(lambda r: None)
    owner.turns.enqueue("k", settled)
    settled.request_stop(Stop.CANCEL)
    assert settled._timer is None  # disarmed at settle


# -- random event sequences ------------------------------------------------------------


class Lifecycle(RuleBasedStateMachine):
    """Writes of several writers on one key, driven the way a runner drives them;
    stops arrive at any moment. The invariants are checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.owner = Owner()
        self.records: list[WriteRecord] = []
        self.runner = _ActingRunner(self)
        self.committed: set[int] = set()  # ids of records whose COMMIT was confirmed

    # the runner's side
    def granted(self, record: WriteRecord) -> None:
        record.runner = self.runner

    def holder(self) -> WriteRecord | None:
        held = [r for r in self.records if r.holds_turn]
        return held[0] if held else None

    def end(self, record: WriteRecord, outcome: Outcome, error: BaseException | None) -> None:
        record.release_turn()
        record.conclude(outcome, "result" if outcome is Outcome.COMMITTED else None, error)

    @rule(writer=st.sampled_from(["A", "B", "C", None]))
    def submit(self, writer: str | None) -> None:
        record = new(self.owner, writer=writer)
        self.records.append(record)
        record.arm(self.granted)
        if self.owner.turns.enqueue(record.key, record):
            record.on_grant()

    @precondition(lambda self: (h := self.holder()) is not None and h.state is State.GRANTED)
    @rule()
    def begin(self) -> None:
        holder = self.holder()
        assert holder is not None
        holder.move(State.RUNNING)

    @precondition(lambda self: (h := self.holder()) is not None and h.state is State.RUNNING)
    @rule(ok=st.booleans(), transient=st.booleans())
    def finish_function(self, ok: bool, transient: bool) -> None:
        holder = self.holder()
        assert holder is not None
        if ok and holder.stop is None:
            holder.move(State.COMMITTING)
            self.committed.add(id(holder))
            self.end(holder, Outcome.COMMITTED, None)
        else:
            holder.move(State.ROLLING_BACK)
            if transient and holder.stop is None and holder.attempts < 2:
                holder.attempts += 1
                holder.move(State.RETRY_WAIT)
            else:
                self.end(holder, Outcome.ROLLED_BACK, RuntimeError("failed"))

    @precondition(lambda self: (h := self.holder()) is not None and h.state is State.RETRY_WAIT)
    @rule()
    def retry(self) -> None:
        holder = self.holder()
        assert holder is not None
        holder.move(State.RUNNING)

    @precondition(lambda self: bool(self.records))
    @rule(data=st.data(), reason=st.sampled_from(list(Stop)))
    def stop(self, data: st.DataObject, reason: Stop) -> None:
        record = data.draw(st.sampled_from(self.records))
        done = record.state is State.DONE
        assert record.request_stop(reason) is (not done)

    @invariant()
    def one_holder_at_most_and_the_lock_agrees(self) -> None:
        holders = [r for r in self.records if r.holds_turn]
        assert len(holders) <= 1
        stats = self.owner.turns.key_statistics("k")
        assert stats.held is bool(holders)
        queued = [r for r in self.records if r.state is State.QUEUED]
        assert stats.waiting == len(queued)

    @invariant()
    def outcomes_are_final_and_true(self) -> None:
        for r in self.records:
            if r.state is State.DONE:
                assert r.outcome is not Outcome.PENDING
                assert not r.holds_turn
                assert (r.outcome is Outcome.COMMITTED) is (id(r) in self.committed)
                assert r not in self.owner.live
            else:
                assert r.outcome is Outcome.PENDING

    @invariant()
    def a_stop_ends_a_write_outside_its_transaction_at_once(self) -> None:
        for r in self.records:
            if r.stop is not None:
                assert r.state not in (State.QUEUED, State.GRANTED, State.RETRY_WAIT), r

    @invariant()
    def a_stopped_write_never_commits(self) -> None:
        for r in self.records:
            if r.outcome is Outcome.COMMITTED:
                assert r.stop is None


class _ActingRunner:
    """Acts on a stop as the real runners do: a write not inside a transaction ends
    at once; a running one is rolled back at its next step (see finish_function)."""

    def __init__(self, machine: Lifecycle) -> None:
        self.machine = machine

    def stop(self, record: WriteRecord) -> None:
        if record.state in (State.GRANTED, State.RETRY_WAIT):
            self.machine.end(record, record.unbegun_outcome, asyncio.CancelledError())


Lifecycle.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_random_event_sequences = Lifecycle.TestCase
