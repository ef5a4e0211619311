"""How a write ended, as reported by :attr:`WriteHandle.outcome`."""

from __future__ import annotations

import enum

__all__ = ["Outcome"]


class Outcome(enum.StrEnum):
    """The truthful end state of one write.

    ``COMMITTED`` if and only if the write's effects are in the database.
    """

    PENDING = "pending"
    """Queued or running; not decided yet."""
    COMMITTED = "committed"
    """COMMIT was acknowledged by the database: the effects are there."""
    ROLLED_BACK = "rolled_back"
    """The transaction ran and was rolled back (or its connection died before COMMIT)."""
    WITHDRAWN = "withdrawn"
    """The write left the queue before its turn; its function never ran."""
    UNKNOWN = "unknown"
    """The connection died while COMMIT was in flight and the result could not be learned."""
