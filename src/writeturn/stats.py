"""Counters a serializer keeps, and the frozen snapshot :meth:`WriteSerializer.stats` returns."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields

from .outcome import Outcome

__all__ = ["SerializerStats"]


@dataclass(frozen=True, slots=True)
class SerializerStats:
    """A snapshot of one serializer.

    ``committed``, ``rolled_back``, ``withdrawn``, ``unknown``: finished writes
    by outcome. ``queued``: writes waiting for their turn. ``running``: writes
    holding a turn. ``cancel_requests``: cancellations and timeouts that
    reached a write before it finished. ``interrupts``: statements the driver
    was asked to stop after a cancellation outlasted ``cancel_grace``.
    ``connections_invalidated``: connections writeturn's writes had to discard
    (the cost of a reconnect each). ``retries``: transient failures retried.
    ``wait_p50``, ``wait_p99``: seconds from submission to the turn;
    ``hold_p50``, ``hold_p99``: seconds a turn was held; both over the last
    4,096 writes (0.0 before any).
    """

    committed: int
    rolled_back: int
    withdrawn: int
    unknown: int
    queued: int
    running: int
    cancel_requests: int
    interrupts: int
    connections_invalidated: int
    retries: int
    wait_p50: float
    wait_p99: float
    hold_p50: float
    hold_p99: float

    def __repr__(self) -> str:
        # The durations in milliseconds: wait_p50=0.037 ms reads better than 3.67e-05.
        parts = (
            f"{f.name}={_ms(value)}" if isinstance(value, float) else f"{f.name}={value}"
            for f in fields(self)
            for value in (getattr(self, f.name),)
        )
        return f"SerializerStats({', '.join(parts)})"


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


_WINDOW = 4096

#: Called with ("wait" or "hold", seconds) for each sample a serializer records.
Observer = Callable[[str, float], None]


class _Samples(deque[float]):
    """The last samples of one kind; each appended sample is also told to the observers."""

    def __init__(self, kind: str, observers: list[Observer]) -> None:
        super().__init__(maxlen=_WINDOW)
        self.kind = kind
        self.observers = observers

    def append(self, value: float) -> None:
        super().append(value)
        # A snapshot: an observer that stops itself (or another) while called must not
        # make the next one miss this sample.
        for observer in tuple(self.observers):
            try:
                observer(self.kind, value)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:
                # Samples are taken inside a write's state changes: whatever an observer
                # raises (CancelledError included) must not cut one short. No uncancel():
                # the observer is synchronous, so what it raised is its own, never a
                # cancellation of this task, which arrives only at an await.
                logging.getLogger("writeturn").exception("a stats observer failed")


def _percentile(samples: deque[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Counters:
    """The mutable counters behind :class:`SerializerStats`."""

    __slots__ = (
        "by_outcome",
        "cancel_requests",
        "interrupts",
        "connections_invalidated",
        "retries",
        "waits",
        "holds",
        "observers",
    )

    def __init__(self) -> None:
        self.by_outcome: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.cancel_requests = 0
        self.interrupts = 0
        self.connections_invalidated = 0
        self.retries = 0
        # The one hook for exporters (writeturn.metrics): told of every wait and hold sample.
        self.observers: list[Observer] = []
        self.waits: deque[float] = _Samples("wait", self.observers)
        self.holds: deque[float] = _Samples("hold", self.observers)

    def snapshot(self, queued: int, running: int) -> SerializerStats:
        o = self.by_outcome
        return SerializerStats(
            committed=o[Outcome.COMMITTED],
            rolled_back=o[Outcome.ROLLED_BACK],
            withdrawn=o[Outcome.WITHDRAWN],
            unknown=o[Outcome.UNKNOWN],
            queued=queued,
            running=running,
            cancel_requests=self.cancel_requests,
            interrupts=self.interrupts,
            connections_invalidated=self.connections_invalidated,
            retries=self.retries,
            wait_p50=_percentile(self.waits, 0.5),
            wait_p99=_percentile(self.waits, 0.99),
            hold_p50=_percentile(self.holds, 0.5),
            hold_p99=_percentile(self.holds, 0.99),
        )
