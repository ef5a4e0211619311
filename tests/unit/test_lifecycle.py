"""The serializer's lifecycle state machine: its table on its own, every move in every
phase."""

from __future__ import annotations

import itertools

import pytest

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
