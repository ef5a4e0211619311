"""The serializer's lifecycle state machine: its table on its own, every move in every
phase; then a real serializer on a SQLite file, in the cases its close and start make,
and under random sequences of start(), close(), close(drain=False) and writes
(hypothesis), checking that its moves follow the table and that it takes writes
exactly when started."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from writeturn import Outcome, SerializerClosed, SerializerNotStarted, WriteHandle, WriteSerializer
from writeturn._lifecycle import TRANSITIONS, Lifecycle, Phase

# -- the transition table -------------------------------------------------------

ALLOWED = [
    (Phase.NEW, Phase.STARTED),
    (Phase.NEW, Phase.CLOSING),
    (Phase.STARTED, Phase.CLOSING),
    (Phase.CLOSING, Phase.CLOSED),
]


def in_phase(phase: Phase) -> Lifecycle:
    """A lifecycle brought to ``phase`` along allowed moves."""
    life = Lifecycle()
    path = {
        Phase.NEW: [],
        Phase.STARTED: [Phase.STARTED],
        Phase.CLOSING: [Phase.STARTED, Phase.CLOSING],
        Phase.CLOSED: [Phase.STARTED, Phase.CLOSING, Phase.CLOSED],
    }[phase]
    for to in path:
        life.move(to)
    assert life.phase is phase
    return life


def test_the_table_is_the_one_documented() -> None:
    assert sorted((a.value, b.value) for a, nexts in TRANSITIONS.items() for b in nexts) == (
        sorted((a.value, b.value) for a, b in ALLOWED)
    )


def test_a_lifecycle_starts_new_and_refuses_writes() -> None:
    life = Lifecycle()
    assert life.phase is Phase.NEW and not life.accepts_writes


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(Phase, Phase)))
def test_move_follows_the_transition_table(src: Phase, dst: Phase) -> None:
    life = in_phase(src)
    if (src, dst) in ALLOWED:
        life.move(dst)
        assert life.phase is dst
    else:
        with pytest.raises(AssertionError, match=f"{src.name} -> {dst.name}$"):
            life.move(dst)
        assert life.phase is src


@pytest.mark.parametrize("phase", list(Phase))
def test_writes_are_accepted_only_when_started(phase: Phase) -> None:
    assert in_phase(phase).accepts_writes is (phase is Phase.STARTED)


def test_every_phase_reaches_closed_and_none_goes_back() -> None:
    order = list(Phase)
    for phase in Phase:
        seen, frontier = {phase}, [phase]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                assert order.index(nxt) > order.index(phase)  # forwards only
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert Phase.CLOSED in seen, phase


def test_the_phases_show_as_repr_and_messages_have_always_shown_them() -> None:
    assert [p.value for p in Phase] == ["new", "started", "closing", "closed"]
    assert repr(in_phase(Phase.CLOSING)) == "<lifecycle closing>"


# -- a real serializer's moves ------------------------------------------------------


async def _noop(session: Any) -> int:
    return 1


@contextlib.contextmanager
def recorded_moves() -> Iterator[list[tuple[Phase, Phase]]]:
    """Every move any lifecycle makes meanwhile, as (from, to), made as before."""
    moves: list[tuple[Phase, Phase]] = []
    move = Lifecycle.move

    def spy(self: Lifecycle, to: Phase) -> None:
        moves.append((self.phase, to))
        move(self, to)

    with patch.object(Lifecycle, "move", spy):
        yield moves


def phase(ser: WriteSerializer) -> Phase:
    return ser._rt.lifecycle.phase


STARTED_AND_CLOSED = [
    (Phase.NEW, Phase.STARTED),
    (Phase.STARTED, Phase.CLOSING),
    (Phase.CLOSING, Phase.CLOSED),
]


async def test_close_on_a_serializer_never_started_passes_through_closing(
    sqlite_url: str,
) -> None:
    with recorded_moves() as moves:
        ser = WriteSerializer.from_url(sqlite_url)
        closing = ser.close()
        assert phase(ser) is Phase.CLOSING
        await closing
    assert moves == [(Phase.NEW, Phase.CLOSING), (Phase.CLOSING, Phase.CLOSED)]
    with pytest.raises(SerializerClosed, match="create a new one"):
        await ser.start()


@pytest.mark.parametrize("drain", [True, False])
async def test_close_twice_moves_once(sqlite_url: str, drain: bool) -> None:
    with recorded_moves() as moves:
        ser = WriteSerializer.from_url(sqlite_url)
        await ser.start()
        first = ser.close()
        second = ser.close(drain=drain)  # both before either runs
        await asyncio.gather(first, second)
        await ser.close()  # and once it is closed
    assert moves == STARTED_AND_CLOSED
    assert " closed " in repr(ser)


@pytest.mark.parametrize("raises", [False, True])
async def test_an_async_with_exit_closes_along_the_table(sqlite_url: str, raises: bool) -> None:
    with recorded_moves() as moves:
        ser = WriteSerializer.from_url(sqlite_url)
        with contextlib.suppress(RuntimeError):
            async with ser:
                assert phase(ser) is Phase.STARTED
                await ser.run(_noop, key="k")
                if raises:  # closed with drain=False
                    raise RuntimeError("boom")
    assert moves == STARTED_AND_CLOSED


async def test_start_losing_to_close_makes_no_move(sqlite_url: str) -> None:
    with recorded_moves() as moves:
        ser = WriteSerializer.from_url(sqlite_url)
        starting = asyncio.ensure_future(ser.start())
        await asyncio.sleep(0)  # start() is connecting
        closing = ser.close()
        with pytest.raises(SerializerClosed, match="closed while it started"):
            await starting
        await closing
    assert moves == [(Phase.NEW, Phase.CLOSING), (Phase.CLOSING, Phase.CLOSED)]


def _sqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


@pytest.mark.parametrize("drain", [True, False])
async def test_closed_only_once_the_connection_of_a_start_it_beat_is_closed(
    sqlite_url: str, drain: bool
) -> None:
    # close()'s task used to run while start() still held the connection it checks the
    # database with: it disposed the engine, showed CLOSED, and start() then handed its
    # connection back to the disposed pool, where it stayed open for good.
    before = _sqlite_threads()
    ser = WriteSerializer.from_url(sqlite_url)
    starting = asyncio.ensure_future(ser.start())
    await asyncio.sleep(0)  # start() is connecting
    await ser.close(drain=drain)
    assert phase(ser) is Phase.CLOSED
    with pytest.raises(SerializerClosed, match="closed while it started"):
        await starting
    left = _sqlite_threads() - before
    for thread in left:
        thread.join(timeout=5)
    assert not [t.name for t in left if t.is_alive()], "a connection of start() is still open"


async def test_a_start_while_another_connects_finds_the_serializer_started(
    sqlite_url: str,
) -> None:
    # start() is idempotent; the second one used to take the first one's move for a
    # close() it had not seen, and raise SerializerClosed on a started serializer.
    with recorded_moves() as moves:
        ser = WriteSerializer.from_url(sqlite_url)
        started = await asyncio.gather(ser.start(), ser.start(), return_exceptions=True)
        try:
            assert started == [None, None]
            assert phase(ser) is Phase.STARTED
            assert await ser.run(_noop, key="k") == 1
        finally:
            await ser.close()
    assert moves == STARTED_AND_CLOSED


@pytest.mark.parametrize("closed", [False, True], ids=["closing", "closed"])
async def test_a_transaction_made_while_started_is_refused_once_close_was_called(
    sqlite_url: str, closed: bool
) -> None:
    ser = WriteSerializer.from_url(sqlite_url)
    await ser.start()
    ctx = ser.transaction(key="k")  # accepted: STARTED
    closing = asyncio.ensure_future(ser.close())
    if closed:
        await closing
    try:
        with pytest.raises(SerializerClosed):
            async with ctx:  # entered in CLOSING or CLOSED: its write would run now
                pass
        assert ctx.handle.outcome is Outcome.WITHDRAWN
    finally:
        await closing


# -- random sequences against a real serializer -----------------------------------------

#: What a sequence is made of: start() awaited at once or left running ("start_bg"),
#: close() and close(drain=False) left running, a write, a transaction() call, one
#: loop step, and waiting for everything left running. Writes weigh triple: most
#: sequences should have some, and a started serializer should take some.
OPS = [
    "start",
    "start_bg",
    "close",
    "close_stop",
    "submit",
    "submit",
    "submit",
    "transaction",
    "step",
    "settle",
]


async def _drive(url: str, ops: list[str]) -> None:
    """Run ``ops`` against one serializer, checking each refusal as it happens; then
    close it and check every move it made and every phase seen follow the table."""
    closes = 0  # close() calls so far
    stopped = False  # a close(drain=False) was called
    tasks: list[asyncio.Future[Any]] = []
    accepted: list[WriteHandle[Any]] = []
    with recorded_moves() as moves:
        ser = WriteSerializer.from_url(url)
        life = ser._rt.lifecycle
        seen = [life.phase]

        def observe() -> None:
            if life.phase is not seen[-1]:
                seen.append(life.phase)

        async def starting() -> None:
            try:
                await ser.start()
            except SerializerClosed:
                assert closes > 0, "start() raised SerializerClosed, but nothing closed it"
            else:
                assert life.phase is Phase.STARTED, "start() returned, not started"
            observe()

        try:
            for op in ops:
                observe()
                before = life.phase
                if op == "start":
                    await starting()
                elif op == "start_bg":
                    tasks.append(asyncio.ensure_future(starting()))
                elif op in ("close", "close_stop"):
                    closes += 1
                    stopped |= op == "close_stop"
                    closing = ser.close(drain=op == "close")
                    # CLOSING from the call on, before its coroutine ever ran.
                    assert life.phase is (Phase.CLOSED if before is Phase.CLOSED else Phase.CLOSING)
                    observe()
                    tasks.append(asyncio.ensure_future(closing))
                elif op in ("submit", "transaction"):
                    try:
                        if op == "submit":
                            accepted.append(ser.submit(_noop, key="k"))
                        else:
                            ser.transaction(key="k")  # not entered: refused or not, nothing runs
                    except SerializerNotStarted:
                        assert before is Phase.NEW, before
                    except SerializerClosed as exc:
                        assert before in (Phase.CLOSING, Phase.CLOSED), before
                        assert f"is {before.value};" in str(exc)
                    else:
                        assert before is Phase.STARTED, before
                elif op == "step":
                    await asyncio.sleep(0)
                else:  # settle
                    await asyncio.gather(*tasks)
                observe()
            closes += 1
            closing = ser.close()
            observe()
            await closing
            observe()
            await asyncio.gather(*tasks)
            observe()
        finally:
            if life.phase is not Phase.CLOSED:  # a check failed: close all the same
                with contextlib.suppress(BaseException):
                    await ser.close(drain=False)
            await asyncio.gather(*tasks, return_exceptions=True)

    assert life.phase is Phase.CLOSED
    # The moves made, in order, are a path through the table from NEW; every phase
    # the caller saw is on it, and none was skipped between two looks.
    assert [src for src, _ in moves] == [Phase.NEW] + [dst for _, dst in moves[:-1]]
    for src, dst in moves:
        assert dst in TRANSITIONS[src], (src, dst)
    assert seen == [Phase.NEW] + [dst for _, dst in moves]
    # What was accepted ended: committed, unless a close(drain=False) stopped it.
    for handle in accepted:
        assert handle.done()
        if stopped:
            assert handle.outcome in (Outcome.COMMITTED, Outcome.WITHDRAWN, Outcome.ROLLED_BACK)
        else:
            assert handle.outcome is Outcome.COMMITTED, handle


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(start_first=st.booleans(), ops=st.lists(st.sampled_from(OPS), max_size=16))
# What it found on the old code, kept: two start()s at once (the second raised
# SerializerClosed), and a close() while start() connects (its connection stayed open).
@example(start_first=False, ops=["start_bg", "start", "settle"])
@example(start_first=False, ops=["start_bg", "step"])
def test_random_calls_follow_the_table_and_writes_are_taken_only_when_started(
    tmp_path: Path, start_first: bool, ops: list[str]
) -> None:
    # Half the sequences begin started: a close() drawn early would end most others
    # before anything was accepted.
    ops = ["start", *ops] if start_first else ops
    before = _sqlite_threads()
    asyncio.run(_drive(f"sqlite+aiosqlite:///{tmp_path}/x.db", ops))
    left = _sqlite_threads() - before
    for thread in left:
        thread.join(timeout=5)
    assert not [t.name for t in left if t.is_alive()], "a connection is still open after close()"
