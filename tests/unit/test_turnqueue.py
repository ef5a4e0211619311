"""The pure scheduling core: exact turn orders, withdrawal, and a randomized model check.

No event loop here: ``TurnQueue`` is synchronous bookkeeping.
"""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest

from writeturn._turnqueue import Entry, TurnQueue


class E(Entry):
    """An entry with a readable name, so failures show which entry came out."""

    __slots__ = ("name",)

    def __init__(self, writer: Hashable | None, name: str) -> None:
        super().__init__(writer)
        self.name = name

    def __repr__(self) -> str:
        return f"E({self.writer!r}, {self.name!r})"


def push_all(q: TurnQueue[E], *specs: tuple[Hashable | None, str]) -> dict[str, E]:
    """Push one entry per (writer, name), in order; return them by name."""
    made: dict[str, E] = {}
    for writer, name in specs:
        e = E(writer, name)
        q.push(e)
        made[name] = e
    return made


def drain(q: TurnQueue[E]) -> list[str]:
    """Pop until empty; the names in grant order. Bounded, so a broken queue cannot spin."""
    out: list[str] = []
    for _ in range(10_000):
        e = q.pop()
        if e is None:
            return out
        assert not e.queued
        out.append(e.name)
    raise AssertionError("queue never ran empty")


# -- exact orders ---------------------------------------------------------------------


def test_two_bursts_alternate() -> None:
    q: TurnQueue[E] = TurnQueue()
    push_all(q, *[("A", f"a{i}") for i in range(5)], *[("B", f"b{i}") for i in range(5)])
    assert len(q) == 10
    order = drain(q)
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
    assert "".join(name[0].upper() for name in order) == "ABABABABAB"
    assert len(q) == 0


def test_a_a_b_c_a() -> None:
    # Pushed: a1, a2 (A), b1 (B), c1 (C), a3 (A). Ring of writers: [A, B, C].
    #   pop -> a1; A still has a2, a3, so it goes behind everyone: ring [B, C, A]
    #   pop -> b1; B is empty and leaves:                         ring [C, A]
    #   pop -> c1; C leaves:                                      ring [A]
    #   pop -> a2, then a3 (A is the only writer left; FIFO within A).
    q: TurnQueue[E] = TurnQueue()
    push_all(q, ("A", "a1"), ("A", "a2"), ("B", "b1"), ("C", "c1"), ("A", "a3"))
    assert q.waiting_writers() == ["A", "B", "C"]
    assert drain(q) == ["a1", "b1", "c1", "a2", "a3"]


def test_fifo_within_one_writer() -> None:
    q: TurnQueue[E] = TurnQueue()
    push_all(q, *[("A", f"a{i}") for i in range(20)])
    assert drain(q) == [f"a{i}" for i in range(20)]


def test_anonymous_entries_keep_arrival_order() -> None:
    q: TurnQueue[E] = TurnQueue()
    push_all(q, *[(None, f"n{i}") for i in range(8)])
    assert q.waiting_writers() == [None] * 8
    assert drain(q) == [f"n{i}" for i in range(8)]


def test_anonymous_entries_interleave_round_robin_with_named_writers() -> None:
    # Pushed: a1 a2 (A), n1 (anon), b1 (B), n2 (anon), a3 (A). Ring: [A, n1, B, n2].
    #   a1 -> ring [n1, B, n2, A]; n1 -> [B, n2, A]; b1 -> [n2, A]; n2 -> [A]; a2; a3.
    q: TurnQueue[E] = TurnQueue()
    push_all(q, ("A", "a1"), ("A", "a2"), (None, "n1"), ("B", "b1"), (None, "n2"), ("A", "a3"))
    assert q.waiting_writers() == ["A", None, "B", None]
    assert drain(q) == ["a1", "n1", "b1", "n2", "a2", "a3"]


def test_writer_that_had_a_turn_goes_behind_writers_that_arrived_meanwhile() -> None:
    # Ring [A, B]; a1 popped -> [B, A]; C arrives -> [B, A, C];
    # b1 -> [A, C, B]; a2 -> [C, B]; c1 -> [B]; b2.
    q: TurnQueue[E] = TurnQueue()
    push_all(q, ("A", "a1"), ("A", "a2"), ("B", "b1"), ("B", "b2"))
    first = q.pop()
    assert first is not None and first.name == "a1"
    push_all(q, ("C", "c1"))
    assert q.waiting_writers() == ["B", "A", "C"]
    assert drain(q) == ["b1", "a2", "c1", "b2"]


def test_writer_emptied_by_pop_rejoins_at_the_back() -> None:
    # Ring [A, B]; a1 popped and A leaves: ring [B]. A pushes again: ring [B, A].
    q: TurnQueue[E] = TurnQueue()
    push_all(q, ("A", "a1"), ("B", "b1"), ("B", "b2"))
    first = q.pop()
    assert first is not None and first.name == "a1"
    push_all(q, ("A", "a2"))
    assert q.waiting_writers() == ["B", "A"]
    assert drain(q) == ["b1", "a2", "b2"]


# -- withdrawal -----------------------------------------------------------------------


def test_withdraw_from_the_middle_keeps_everyone_elses_order() -> None:
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, ("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1"), ("B", "b2"), (None, "n1"))
    assert q.withdraw(e["a2"]) is True
    assert not e["a2"].queued
    assert len(q) == 5
    # Ring [A, B, n1]: a1 -> [B, n1, A]; b1 -> [n1, A, B]; n1 -> [A, B]; a3; b2.
    assert drain(q) == ["a1", "b1", "n1", "a3", "b2"]


def test_withdraw_anonymous_entry_keeps_order_of_the_rest() -> None:
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, (None, "n1"), ("A", "a1"), (None, "n2"), (None, "n3"))
    assert q.withdraw(e["n2"]) is True
    assert q.waiting_writers() == [None, "A", None]
    assert len(q) == 3
    assert drain(q) == ["n1", "a1", "n3"]


def test_withdraw_returns_false_when_not_queued() -> None:
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, ("A", "a1"), ("A", "a2"))
    never = E("A", "never")
    assert q.withdraw(never) is False
    assert q.withdraw(e["a2"]) is True
    assert q.withdraw(e["a2"]) is False  # twice
    popped = q.pop()
    assert popped is e["a1"]
    assert q.withdraw(e["a1"]) is False  # already granted
    assert len(q) == 0
    assert q.pop() is None


def test_writer_whose_entries_were_all_withdrawn_rejoins_at_the_back() -> None:
    # Ring [A, B, C]. A withdraws everything and leaves; D arrives; A pushes again:
    # A must be behind D (it lost its old place), i.e. ring [B, C, D, A].
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, ("A", "a1"), ("A", "a2"), ("B", "b1"), ("C", "c1"))
    assert q.withdraw(e["a1"]) and q.withdraw(e["a2"])
    assert q.waiting_writers() == ["B", "C"]
    push_all(q, ("D", "d1"))
    push_all(q, ("A", "a3"))
    assert q.waiting_writers() == ["B", "C", "D", "A"]
    assert len(q) == 4
    assert drain(q) == ["b1", "c1", "d1", "a3"]


def test_rejoin_at_back_even_with_dead_entries_left_in_the_old_lane() -> None:
    # a1 and a2 are queued; a2 is withdrawn (a dead entry left lying in A's lane).
    # a1 is popped: A now has nothing live and leaves the ring. B, then A push again.
    # A must come after B although its old lane still held the dead a2.
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, ("A", "a1"), ("A", "a2"))
    assert q.withdraw(e["a2"])
    first = q.pop()
    assert first is e["a1"]
    assert len(q) == 0 and q.waiting_writers() == []
    push_all(q, ("B", "b1"), ("A", "a3"), ("B", "b2"))
    assert q.waiting_writers() == ["B", "A"]
    assert drain(q) == ["b1", "a3", "b2"]


def test_rejoin_at_back_after_withdrawal_while_at_the_front() -> None:
    # A is at the front of the ring with a dead entry and a live one; the live one is
    # withdrawn too, so A leaves. C arrives, then A pushes: order B, C, A.
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, ("A", "a1"), ("A", "a2"), ("B", "b1"))
    assert q.withdraw(e["a1"])
    assert q.waiting_writers() == ["A", "B"]
    assert q.withdraw(e["a2"])
    push_all(q, ("C", "c1"), ("A", "a3"))
    assert q.waiting_writers() == ["B", "C", "A"]
    assert drain(q) == ["b1", "c1", "a3"]


def test_withdraw_then_push_a_new_entry_of_a_still_waiting_writer_keeps_its_place() -> None:
    # A still has live entries, so it never left the ring and keeps its place.
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, ("A", "a1"), ("A", "a2"), ("B", "b1"))
    assert q.withdraw(e["a1"])
    push_all(q, ("A", "a3"))
    assert q.waiting_writers() == ["A", "B"]
    assert drain(q) == ["a2", "b1", "a3"]


def test_len_counts_live_entries_only() -> None:
    q: TurnQueue[E] = TurnQueue()
    assert len(q) == 0
    e = push_all(q, ("A", "a1"), ("A", "a2"), (None, "n1"), ("B", "b1"))
    assert len(q) == 4
    q.withdraw(e["a1"])
    assert len(q) == 3
    q.withdraw(e["n1"])
    assert len(q) == 2
    q.withdraw(e["n1"])  # a second withdrawal changes nothing
    assert len(q) == 2
    assert q.pop() is e["a2"]
    assert len(q) == 1
    assert q.pop() is e["b1"]
    assert len(q) == 0
    assert q.pop() is None
    assert len(q) == 0


def test_waiting_writers_is_the_order_turns_come_in() -> None:
    q: TurnQueue[E] = TurnQueue()
    assert q.waiting_writers() == []
    e = push_all(q, ("B", "b1"), (None, "n1"), ("A", "a1"), ("B", "b2"), ("C", "c1"))
    assert q.waiting_writers() == ["B", None, "A", "C"]
    q.withdraw(e["n1"])
    assert q.waiting_writers() == ["B", "A", "C"]
    assert q.pop() is e["b1"]
    assert q.waiting_writers() == ["A", "C", "B"]
    q.withdraw(e["c1"])
    assert q.waiting_writers() == ["A", "B"]


def test_entry_queued_flag() -> None:
    q: TurnQueue[E] = TurnQueue()
    a, n = E("A", "a"), E(None, "n")
    assert not a.queued and not n.queued
    q.push(a)
    q.push(n)
    assert a.queued and n.queued
    assert q.pop() is a
    assert not a.queued and n.queued
    q.withdraw(n)
    assert not n.queued
    assert q.pop() is None


def test_repr_shows_live_counts() -> None:
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, ("A", "a1"), ("A", "a2"), ("B", "b1"), (None, "n1"))
    assert repr(q) == "<TurnQueue waiting=4 writers=2>"
    q.withdraw(e["b1"])
    assert repr(q) == "<TurnQueue waiting=3 writers=1>"


@pytest.mark.parametrize("writer", ["A", None])
def test_an_entry_is_queued_once(writer: str | None) -> None:
    """A granted or withdrawn entry may still lie in its old place: pushing it again is refused."""
    q: TurnQueue[E] = TurnQueue()
    e = push_all(q, (writer, "x1"), (writer, "x2"), ("B", "b1"))
    assert q.withdraw(e["x1"])
    with pytest.raises(ValueError, match="queued once"):
        q.push(e["x1"])
    assert not e["x1"].queued
    assert drain(q) == ["x2", "b1"]
    with pytest.raises(ValueError, match="queued once"):
        q.push(e["x2"])
    assert len(q) == 0


# -- randomized check against a reference model -----------------------------------------


class ModelQueue:
    """An obviously-correct reference: a ring of writers and a list per writer, eager removal.

    Each anonymous entry is its own writer (keyed by the entry object itself).
    """

    def __init__(self) -> None:
        self.ring: list[object] = []  # writer keys in turn order, each at most once
        self.lanes: dict[object, list[E]] = {}

    @staticmethod
    def key(entry: E) -> object:
        return ("anon", id(entry)) if entry.writer is None else ("named", entry.writer)

    def push(self, entry: E) -> None:
        k = self.key(entry)
        if k not in self.lanes:
            self.lanes[k] = []
            self.ring.append(k)
        self.lanes[k].append(entry)

    def withdraw(self, entry: E) -> bool:
        k = self.key(entry)
        lane = self.lanes.get(k)
        if lane is None or entry not in lane:
            return False
        lane.remove(entry)
        if not lane:
            del self.lanes[k]
            self.ring.remove(k)
        return True

    def pop(self) -> E | None:
        if not self.ring:
            return None
        k = self.ring.pop(0)
        lane = self.lanes[k]
        entry = lane.pop(0)
        if lane:
            self.ring.append(k)
        else:
            del self.lanes[k]
        return entry

    def __len__(self) -> int:
        return sum(len(lane) for lane in self.lanes.values())

    def waiting_writers(self) -> list[Hashable | None]:
        return [self.lanes[k][0].writer for k in self.ring]


@pytest.mark.parametrize("seed", [1234, 1, 2, 3, 4, 5])
def test_random_operations_match_the_reference_model(seed: int) -> None:
    rng = random.Random(seed)
    q: TurnQueue[E] = TurnQueue()
    model = ModelQueue()
    queued: list[E] = []  # live entries, for picking one to withdraw
    gone: list[E] = []  # popped or withdrawn entries
    writers = ["w0", "w1", "w2", "w3", "w4", "w5", 7, ("t", 1)]
    pops = withdraws = 0
    max_len = 0
    for step in range(20_000):
        # Alternate filling and draining phases, so the queue is sometimes long
        # (many dead entries lying around) and sometimes runs empty.
        p_push = 0.6 if (step // 500) % 2 == 0 else 0.3
        r = rng.random()
        if r < p_push * 0.75:
            e = E(rng.choice(writers), f"s{step}")
            q.push(e)
            model.push(e)
            queued.append(e)
        elif r < p_push:
            e = E(None, f"s{step}")
            q.push(e)
            model.push(e)
            queued.append(e)
        elif r < p_push + (1 - p_push) * 0.40:
            if queued:
                e = queued.pop(rng.randrange(len(queued)))
                assert q.withdraw(e) is True, (seed, step, e)
                assert model.withdraw(e) is True
                assert not e.queued
                gone.append(e)
                withdraws += 1
        elif r < p_push + (1 - p_push) * 0.45:
            if gone:
                e = rng.choice(gone)
                assert q.withdraw(e) is False, (seed, step, e)
        else:
            got = q.pop()
            want = model.pop()
            assert got is want, (seed, step, got, want)
            if got is not None:
                assert not got.queued
                queued.remove(got)
                gone.append(got)
                pops += 1
        assert len(q) == len(model) == len(queued), (seed, step)
        max_len = max(max_len, len(q))
        if step % 7 == 0:
            assert q.waiting_writers() == model.waiting_writers(), (seed, step)
            # Every live entry once, and nothing popped or withdrawn (close() stops these).
            entries = q.entries()
            assert len(entries) == len(queued) and set(map(id, entries)) == set(map(id, queued))
    # Drain, still checking every pop.
    while True:
        got, want = q.pop(), model.pop()
        assert got is want
        if got is None:
            break
    assert len(q) == 0 and q.waiting_writers() == []
    # The mix really exercised both paths.
    assert pops > 3000 and withdraws > 2000 and max_len > 20


def test_pop_after_passes_over_the_writer_whose_turn_just_ended() -> None:
    q: TurnQueue[E] = TurnQueue()
    push_all(q, ("A", "a2"), ("B", "b1"), ("A", "a3"))
    assert q.peek(after="A") is not None and q.peek(after="A").name == "b1"  # type: ignore[union-attr]
    assert drain_after(q, "A") == ["b1", "a2", "a3"]
    # Alone in line, the writer keeps its turn.
    push_all(q, ("A", "a4"))
    assert drain_after(q, "A") == ["a4"]


def drain_after(q: TurnQueue[E], writer: str) -> list[str]:
    out: list[str] = []
    last: object = writer
    while (e := q.pop(after=last)) is not None:
        out.append(e.name)
        last = e.writer
    return out
