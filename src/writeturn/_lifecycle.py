"""The serializer's own life as a state machine: the only place its phase changes.

A write has its state machine (:mod:`writeturn._write`); the serializer that
takes the writes has this smaller one. Its phases and the moves allowed
between them::

    NEW ──start() connected──> STARTED
     │                            │
     │ close() (never started)    │ close(), or an ``async with`` block's exit
     │                            │
     └──────────> CLOSING <───────┘
                     │
                     │ the close's task ended (writes settled, engine disposed)
                     ▼
                   CLOSED

There is no other move. In particular:

* NEW never goes straight to CLOSED: closing a serializer that never
  started still passes through CLOSING while its close's task runs.
* Nothing leads back: a started serializer is never NEW again, and a closed
  one never restarts (``start()`` raises :class:`SerializerClosed`).
* ``start()`` that loses to a ``close()`` called while it connected makes no
  move: the phase is CLOSING (or CLOSED) by then, and ``start()`` raises.
* A second ``close()`` makes no move either: it finds CLOSING (or CLOSED)
  already reached and waits for the first one's task. Nor does a ``start()``
  that connected while another one did: it finds STARTED and returns.

Invariants:

* the phase changes only through :meth:`Lifecycle.move`, along ``TRANSITIONS``;
  any other move raises :class:`AssertionError` naming both phases;
* writes are accepted only in STARTED (``submit()``, ``run()`` and
  ``transaction()`` raise :class:`SerializerNotStarted` in NEW and
  :class:`SerializerClosed` in CLOSING and CLOSED);
* CLOSING refuses new writes at once, from the ``close()`` call itself, not
  one loop step later when its coroutine or task first runs: ``close()`` is
  a plain method that moves to CLOSING before it returns its coroutine;
* CLOSED comes only after the close's task ended, so a serializer shown as
  closed has settled its writes and handed back its connections, that of a
  ``start()`` it beat included.
"""

from __future__ import annotations

import enum

from .errors import SerializerClosed, SerializerNotStarted

__all__ = ["Phase", "TRANSITIONS", "Lifecycle"]


class Phase(enum.Enum):
    """A serializer's phase. The values are what ``repr()`` and error messages show."""

    NEW = "new"  # made, not started: writes raise SerializerNotStarted
    STARTED = "started"  # start() reached the database: writes are accepted
    CLOSING = "closing"  # close() was called: no new write; those in flight settle
    CLOSED = "closed"  # the close ended: writes settled, connections handed back


#: The moves a serializer may make; none goes back.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.STARTED, Phase.CLOSING}),
    Phase.STARTED: frozenset({Phase.CLOSING}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class Lifecycle:
    """One serializer's phase, changed only by :meth:`move`."""

    __slots__ = ("_phase",)

    def __init__(self) -> None:
        self._phase = Phase.NEW

    def __repr__(self) -> str:
        return f"<lifecycle {self._phase.value}>"

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def accepts_writes(self) -> bool:
        """Only a started serializer takes new writes."""
        return self._phase is Phase.STARTED

    def refusal(self) -> SerializerNotStarted | SerializerClosed:
        """What a write offered outside STARTED is refused with."""
        if self._phase is Phase.NEW:
            return SerializerNotStarted()
        return SerializerClosed(
            f"this WriteSerializer is {self._phase.value}; it accepts no new writes"
        )

    def move(self, to: Phase) -> None:
        """Go to ``to``; refuse (AssertionError) any move ``TRANSITIONS`` does not allow."""
        # Raised, not asserted: a serializer's few moves cost nothing to check,
        # and the check holds under ``python -O`` too.
        if to not in TRANSITIONS[self._phase]:
            raise AssertionError(f"serializer lifecycle: {self._phase.name} -> {to.name}")
        self._phase = to
