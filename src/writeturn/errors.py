"""The exceptions writeturn raises: one root, :class:`WriteturnError`.

Each class's docstring is its default message. Messages name the bad value and
say how to fix it; they never contain a database password (see
:func:`writeturn.urls.redact`).
"""

from __future__ import annotations

__all__ = [
    "shown",
    "WriteturnError",
    "ConfigurationError",
    "UnsupportedDatabase",
    "SerializerClosed",
    "ReentrantWriteError",
    "TurnTimeout",
    "OutcomeUnknown",
    "TransactionOwnedError",
    "SerializerNotStarted",
    "DatabaseUnreachable",
    "ConnectionLost",
    "QueueFull",
    "JournalMissing",
    "TransactionAborted",
    "PoolExhausted",
    "IdempotencyKeyReused",
]

#: How many characters of a value an error message shows at most.
SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters.

    A cut value ends with ``...`` and, for a string, its full length, so a
    1 MB key is named in a line instead of repeated in full. A string is cut
    before its repr is built: the cost stays small whatever its size.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


class WriteturnError(Exception):
    """A writeturn operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message if message is not None else (self.__doc__ or "").strip())


class ConfigurationError(WriteturnError, ValueError):
    """An option or argument given to writeturn is invalid."""


class UnsupportedDatabase(ConfigurationError):
    """The database URL names a database or driver writeturn does not support."""


class SerializerClosed(WriteturnError):
    """The serializer is closed (or closing) and accepts no more writes."""


class ReentrantWriteError(WriteturnError):
    """A write was started from inside a turn that it would have to wait for."""


class TurnTimeout(WriteturnError, TimeoutError):
    """The write's timeout expired before it committed."""


class OutcomeUnknown(WriteturnError):
    """The connection died while COMMIT was in flight; whether the write landed is unknown."""


class TransactionOwnedError(WriteturnError):
    """The write function tried to commit or roll back the transaction that writeturn owns."""


class SerializerNotStarted(WriteturnError):
    """The serializer is not started: use `async with serializer:` or `await serializer.start()`."""


class DatabaseUnreachable(WriteturnError):
    """The database could not be reached."""


class QueueFull(WriteturnError):
    """Too many writes wait for this key already (max_queue); nothing was queued."""


class ConnectionLost(WriteturnError):
    """The connection to the database was lost during the write; the cause says how."""


class IdempotencyKeyReused(ConfigurationError):
    """The idempotency key was already used by a committed write on a different key."""


class JournalMissing(WriteturnError):
    """The write journal table does not exist: run `writeturn migrate upgrade`."""


class TransactionAborted(WriteturnError):
    """A statement failed inside the write and its error was caught; the database had
    aborted the transaction, so nothing of the write was committed."""


class PoolExhausted(WriteturnError, TimeoutError):
    """No connection of the engine's pool became free in time (pool_timeout); the
    write did not begin."""
