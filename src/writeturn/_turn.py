"""What a runner holds while its writes run: the key's turn, SQLite's gate and the
re-entrancy marker, taken in one order and handed on in the reverse, once each.

Every runner (a submitted write, a batch, a ``transaction()`` block) holds its
place through one :class:`TurnHold`:

1. the key's turn, granted by the turn lock before the runner holds it (owned
   by the write's record, or by a batch that took it over from its first write);
2. the re-entrancy marker (``HELD``): the running task holds this key, so a
   write it starts on the same key is refused instead of waiting for itself;
3. SQLite's gate: one writer per database, whatever the key.

# Invariants:
# - release() hands on the gate first, then the key's turn, then drops the
#   marker, each exactly once whatever path the runner took; a second
#   release() does nothing;
# - the key's turn may be handed on earlier (pass_turn(), as a COMMIT goes out
#   where the database's own lock holds the next write back): release() then
#   does not hand it on again;
# - a runner calls release() only once its transaction has ended and its
#   connection went back (guarantee 4), and before its writes settle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import Token
from typing import Any

from ._runtime import GATE_KEY, HELD, Runtime
from ._write import WriteRecord

__all__ = ["TurnHold"]


class TurnHold:
    """One runner's hold on a key's turn, SQLite's gate and the re-entrancy marker.

    Made once the key's turn has been granted; :meth:`release` hands everything
    on in order. Not shared between runners.
    """

    __slots__ = ("_rt", "_key", "_hand_on", "_turn", "_gate", "_token")

    def __init__(self, rt: Runtime, key: str, hand_on: Callable[[], None]) -> None:
        self._rt = rt
        self._key = key
        self._hand_on = hand_on
        self._turn = True
        self._gate = False
        self._token: Token[Any] | None = None

    @classmethod
    def of_write(cls, rt: Runtime, record: WriteRecord) -> TurnHold:
        """The hold of a write that owns its key's turn itself (a single write, a block)."""
        hold = cls(rt, record.key, record.release_turn)
        hold._turn = record.holds_turn
        return hold

    @classmethod
    def of_batch(cls, rt: Runtime, key: str) -> TurnHold:
        """The hold of a batch, which took the key's turn over from its first write."""
        return cls(rt, key, lambda: rt.release(key))

    def mark(self, task: asyncio.Task[Any]) -> None:
        """Note that ``task`` holds the key's turn (see ``holds_turn``)."""
        self._token = HELD.set((*HELD.get(), (self._rt, self._key, task)))

    async def take_gate(self) -> None:
        """Wait for SQLite's gate (nothing elsewhere); a stop here leaves its line."""
        gate = self._rt.gate
        if gate is not None:
            await gate.acquire(GATE_KEY)
            self._gate = True

    def pass_turn(self) -> None:
        """Hand the key's turn on now, if it is still held."""
        if self._turn:
            self._turn = False
            self._hand_on()

    def release(self) -> None:
        """Hand on the gate, then the key's turn, then drop the marker."""
        if self._gate:
            self._gate = False
            gate = self._rt.gate
            assert gate is not None
            gate.release(GATE_KEY)
        self.pass_turn()
        if self._token is not None:
            HELD.reset(self._token)
            self._token = None
