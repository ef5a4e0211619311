"""Counters a serializer keeps, and the frozen snapshot :meth:`WriteSerializer.stats` returns."""

from __future__ import annotations

from dataclasses import dataclass

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


class Counters:
    """The mutable counters behind :class:`SerializerStats`."""

    __slots__ = (
        "by_outcome",
        "cancel_requests",
        "interrupts",
        "connections_invalidated",
        "retries",
    )

    def __init__(self) -> None:
        self.by_outcome: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.cancel_requests = 0
        self.interrupts = 0
        self.connections_invalidated = 0
        self.retries = 0

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
        )
