"""The serializer's lifecycle state machine: its table on its own, every move in every
phase; then a real serializer on a SQLite file, in the cases its close and start make,
checking that its moves follow the table."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any
from unittest.mock import patch

import pytest

from writeturn import SerializerClosed, WriteSerializer
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
