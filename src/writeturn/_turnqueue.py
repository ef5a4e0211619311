"""The pure scheduling core: who gets the next turn on one key.

No asyncio here: :class:`TurnQueue` is synchronous bookkeeping, so the
fairness rules are unit-tested without an event loop, and the async layers
(:mod:`writeturn.turnlock`, the serializer) stay thin.

Rules (the public promise of :class:`writeturn.TurnLock`):

* FIFO within one writer: a writer's entries are granted in push order.
* Round-robin across writers: writers with pending entries form a ring; the
  writer at the front gets the next turn and, if it still has entries, goes
  to the back, behind every other waiting writer. A writer whose entries are
  all gone leaves the ring, and rejoins at the back when it pushes again.
* The writer whose turn just ended is passed over while any other writer
  waits (``pop(after=writer)``): it may have queued its next entry during its
  turn, or before others queued, when it was granted the turn without waiting.
* Anonymous entries (``writer=None``) are each their own writer, so among
  themselves they run in arrival order.
* Withdrawal is O(1) and lazy: a withdrawn entry is marked and skipped later.
* An entry is queued once: after it was granted or withdrawn it cannot be
  pushed again (a stale copy may still lie in its old place).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

__all__ = ["TurnQueue", "Entry"]


class Entry:
    """One waiting party: owned by a caller, placed in a :class:`TurnQueue`.

    Subclasses add what the async layer needs (a future, a write to start);
    the queue only reads and writes the slots below.
    """

    __slots__ = ("_lane", "writer")

    def __init__(self, writer: Hashable | None) -> None:
        self.writer = writer
        # Where the entry waits: its writer's lane, _ANONYMOUS for an entry
        # that is its own writer; None before it is queued, _SPENT after.
        self._lane: _Lane[Any] | _Marker | None = None

    @property
    def queued(self) -> bool:
        """True while the entry waits in a queue."""
        lane = self._lane
        return lane is not None and lane is not _SPENT


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_ANONYMOUS = _Marker("<anonymous>")  # queued on its own: it sits in the ring directly
_SPENT = _Marker("<spent>")  # granted or withdrawn

E = TypeVar("E", bound=Entry)


class _Lane(Generic[E]):
    """One named writer's FIFO of entries, plus how many of them are live."""

    __slots__ = ("entries", "live", "writer_id", "dead")

    def __init__(self, writer_id: Hashable) -> None:
        self.writer_id = writer_id
        self.entries: deque[E] = deque()
        self.live = 0
        # A dead lane is still referenced from the ring; it is skipped there.
        self.dead = False


class TurnQueue(Generic[E]):
    """Round-robin across writers, FIFO within a writer, O(1) push/withdraw.

    # Invariants:
    # - every lane in ``_lanes`` is not dead and has ``live >= 1``;
    # - a lane's ``live`` equals the number of its entries whose ``_lane`` is it;
    # - every live lane, and every queued anonymous entry, is in ``_ring``
    #   exactly once (dead lanes and withdrawn anonymous entries may linger);
    # - ``_live`` counts every queued entry.
    """

    __slots__ = ("_lanes", "_ring", "_live")

    def __init__(self) -> None:
        self._lanes: dict[Hashable, _Lane[E]] = {}
        # Anonymous entries sit in the ring themselves: a lane (and its
        # deque) per anonymous write would cost more than the write.
        self._ring: deque[_Lane[E] | E] = deque()
        self._live = 0

    def __len__(self) -> int:
        """The number of live (not withdrawn) entries waiting."""
        return self._live

    def __repr__(self) -> str:
        return f"<TurnQueue waiting={self._live} writers={len(self._lanes)}>"

    def push(self, entry: E) -> None:
        """Append ``entry`` behind its writer's earlier entries."""
        if entry._lane is not None:
            raise ValueError(
                f"{entry!r} was already queued; an entry is queued once, so make a new one"
            )
        self._live += 1
        if entry.writer is None:
            entry._lane = _ANONYMOUS
            self._ring.append(entry)
            return
        lane = self._lanes.get(entry.writer)
        if lane is None:
            lane = _Lane(entry.writer)
            self._lanes[entry.writer] = lane
            self._ring.append(lane)
        lane.entries.append(entry)
        lane.live += 1
        entry._lane = lane

    def withdraw(self, entry: E) -> bool:
        """Remove ``entry`` if it is still queued; return whether it was."""
        lane = entry._lane
        if lane is None or lane is _SPENT:
            return False
        entry._lane = _SPENT
        self._live -= 1
        if isinstance(lane, _Lane):
            lane.live -= 1
            if lane.live == 0:
                self._retire(lane)
        return True

    def pop(self, after: Hashable | None = None) -> E | None:
        """Take the entry whose turn is next, or None if nobody waits.

        ``after`` names the writer whose turn just ended: its lane goes behind
        the others if another writer waits.
        """
        ring = self._ring
        while ring:
            item = ring.popleft()
            if isinstance(item, _Lane) and self._passes_over(item, after):
                ring.append(item)
                after = None
                continue
            if not isinstance(item, _Lane):
                if item._lane is not _ANONYMOUS:  # a withdrawn anonymous entry
                    continue
                item._lane = _SPENT
                self._live -= 1
                return item
            lane = item
            if lane.dead:
                continue
            entries = lane.entries
            while True:
                entry = entries.popleft()
                if entry._lane is lane:
                    break
            entry._lane = _SPENT
            lane.live -= 1
            self._live -= 1
            if lane.live:
                ring.append(lane)
            else:
                self._retire(lane)
            return entry
        assert self._live == 0 and not self._lanes
        return None

    def peek(self, after: Hashable | None = None) -> E | None:
        """The entry ``pop(after)`` would return next, left in place (None if nobody waits)."""
        ring = self._ring
        while ring and not self._live_item(ring[0]):
            ring.popleft()  # drop dead lanes and withdrawn anonymous entries now
        for item in ring:
            if not self._live_item(item):
                continue
            if not isinstance(item, _Lane):
                return item
            if self._passes_over(item, after):
                after = None
                continue
            entries = item.entries
            while entries[0]._lane is not item:
                entries.popleft()  # withdrawn entries ahead of the first live one
            return entries[0]
        return None

    def _passes_over(self, lane: _Lane[E], after: Hashable | None) -> bool:
        """Whether ``lane`` belongs to the writer whose turn just ended while others wait."""
        return (
            after is not None
            and not lane.dead
            and lane.writer_id == after
            and self._live > lane.live
        )

    @staticmethod
    def _live_item(item: _Lane[E] | E) -> bool:
        if isinstance(item, _Lane):
            return not item.dead
        return item._lane is _ANONYMOUS

    def entries(self) -> list[E]:
        """Every live entry, in no promised order (O(n))."""
        found: list[E] = []
        for item in self._ring:
            if isinstance(item, _Lane):
                if not item.dead:
                    found.extend(e for e in item.entries if e._lane is item)
            elif item._lane is _ANONYMOUS:
                found.append(item)
        return found

    def waiting_writers(self) -> list[Hashable | None]:
        """The writers with live entries, in the order their turns come."""
        order: list[Hashable | None] = []
        for item in self._ring:
            if isinstance(item, _Lane):
                if not item.dead:
                    order.append(item.writer_id)
            elif item._lane is _ANONYMOUS:
                order.append(None)
        return order

    def _retire(self, lane: _Lane[E]) -> None:
        lane.dead = True
        lane.entries.clear()
        del self._lanes[lane.writer_id]
