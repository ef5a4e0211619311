"""A serializer's options, each checked once, with errors that name the value and the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import String

from .errors import ConfigurationError, shown
from .schema import journal as _journal_table

__all__ = [
    "Coordination",
    "Options",
    "DEFAULT_KEY",
    "MAX_NAMESPACE",
    "MAX_KEY",
    "MAX_WRITER",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_BATCH",
    "MAX_BATCH_WINDOW",
    "MAX_SQLITE_BUSY_TIMEOUT",
    "check_key",
    "check_writer",
    "check_idempotency_key",
    "check_retries",
    "check_seconds",
    "is_seconds",
    "check_busy_timeout",
]

Coordination = Literal["turn", "advisory"]
COORDINATIONS = ("turn", "advisory")
DEFAULT_KEY = ""  # key=None: one serializer-wide key


def _column_length(name: str) -> int:
    column_type = _journal_table.c[name].type
    assert isinstance(column_type, String) and column_type.length is not None
    return column_type.length


# The lengths the write journal's columns hold (schema.py, equal to the
# migrations). They apply to every write, journaled or not, so that turning
# the journal on never starts refusing keys a service has used all along.
MAX_NAMESPACE = _column_length("namespace")
MAX_KEY = _column_length("key")
MAX_WRITER = _column_length("writer")
MAX_IDEMPOTENCY_KEY = _column_length("idempotency_key")

#: A batch is one transaction that holds the key's lock and a connection until
#: its last write is done, and one failed write re-runs all the others; the
#: gain of group commit flattens out at a few dozen writes (see BENCHMARKS.md).
MAX_BATCH = 10_000
#: The window delays every write of a batch that is not full; group commit
#: wants milliseconds, and a longer window is a stall, not a batch.
MAX_BATCH_WINDOW = 1.0
#: SQLite takes its busy timeout as a 32-bit signed count of milliseconds;
#: anything larger wraps around (to 0: a locked database fails at once).
MAX_SQLITE_BUSY_TIMEOUT = (2**31 - 1) / 1000


@dataclass(frozen=True, slots=True)
class Options:
    """What every write of one serializer shares (see :class:`WriteSerializer`)."""

    coordination: Coordination = "advisory"
    namespace: str = "writeturn"
    cancel_grace: float = 0.05
    journal: bool = False
    batch_max: int = 1
    batch_window: float = 0.0
    retries: int = 0
    retry_backoff: float = 0.05
    max_queue: int | None = None
    cleanup_timeout: float = 5.0
    pgbouncer: bool = False

    def __post_init__(self) -> None:
        if self.coordination not in COORDINATIONS:
            raise ConfigurationError(
                f"coordination={shown(self.coordination)} is not a coordination mode; use "
                "'advisory' (database locks, safe across processes) or 'turn' (this process is "
                "the only writer)"
            )
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigurationError(
                f"namespace={shown(self.namespace)} must be a non-empty string, "
                "e.g. namespace='myservice'"
            )
        _check_text("namespace", self.namespace, MAX_NAMESPACE, "namespace='myservice'")
        check_seconds("cancel_grace", self.cancel_grace, allow_zero=True)
        if not _whole(self.batch_max) or not 1 <= self.batch_max <= MAX_BATCH:
            raise ConfigurationError(
                f"batch_max={shown(self.batch_max)} must be a whole number of writes from 1 "
                f"to {MAX_BATCH} (1 turns group commit off; e.g. batch_max=64). A batch is one "
                "transaction holding the key's lock until its last write is done, and one "
                "failed write re-runs all the others; the gain flattens out at a few dozen"
            )
        check_seconds(
            "batch_window",
            self.batch_window,
            allow_zero=True,
            at_most=MAX_BATCH_WINDOW,
            why="the window delays every write of a batch that is not full, and group "
            "commit needs only milliseconds (e.g. batch_window=0.002)",
        )
        check_retries(self.retries)
        if self.max_queue is not None and (not _whole(self.max_queue) or self.max_queue < 1):
            raise ConfigurationError(
                f"max_queue={shown(self.max_queue)} must be a whole number of writes, 1 or more, "
                "or None (no limit)"
            )
        check_seconds("cleanup_timeout", self.cleanup_timeout, allow_zero=False)
        check_seconds("retry_backoff", self.retry_backoff, allow_zero=True)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_key(key: object) -> str:
    if key is None:
        return DEFAULT_KEY
    if not isinstance(key, str) or not key:
        raise ConfigurationError(
            f"key must be a non-empty string or None, got {shown(key)}; name what the write "
            "protects, e.g. key=f'account:{account_id}'"
        )
    return _check_text("key", key, MAX_KEY, "key=f'account:{account_id}'")


def check_writer(writer: object) -> str | None:
    if writer is None:
        return None
    if not isinstance(writer, str):
        raise ConfigurationError(
            f"writer must be a string naming who writes (e.g. writer='billing') or None, "
            f"got {shown(writer)}"
        )
    return _check_text("writer", writer, MAX_WRITER, "writer='billing'")


def check_idempotency_key(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            f"idempotency_key must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} "
            f"characters, got {shown(value)}; use a request id, e.g. "
            "idempotency_key=f'payment:{request_id}'"
        )
    return _check_text(
        "idempotency_key", value, MAX_IDEMPOTENCY_KEY, "idempotency_key=f'payment:{request_id}'"
    )


def _check_text(name: str, value: str, limit: int, example: str) -> str:
    """Refuse what the journal cannot store and what would make two lock ids equal.

    At most ``limit`` characters (the journal column's size); no NUL, which
    Postgres cannot store in text and which joins namespace and key in the
    lock-id derivation (see :func:`writeturn.dialects.lock_id`); and text
    that UTF-8 can encode (no lone surrogates), as both databases need.
    """
    if len(value) > limit:
        raise ConfigurationError(
            f"{name} {shown(value)} is over the limit of {limit} characters (the size of "
            f"the write journal's {name} column); use a shorter name, e.g. {example}, and "
            "to tell long values apart, a digest of them"
        )
    if "\x00" in value:
        raise ConfigurationError(
            f"{name} {shown(value)} contains a NUL character (\\x00), which Postgres cannot "
            "store and which would let two different names share a lock; remove it, e.g. "
            f"{example}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"{name} {shown(value)} is not text UTF-8 can encode (it holds a lone surrogate); "
            f"decode the bytes it came from properly, e.g. {example}"
        ) from None
    return value


def check_retries(value: object) -> int:
    if not _whole(value) or value < 0:  # type: ignore[operator]
        raise ConfigurationError(
            f"retries={shown(value)} must be a whole number, 0 or more (e.g. retries=3)"
        )
    return value  # type: ignore[return-value]


def is_seconds(value: object, *, allow_zero: bool) -> bool:
    """Whether ``value`` is a number of seconds: a finite int or float (not a bool),
    above 0, or from 0 with ``allow_zero``. The one such check of the library, the
    command line and the tools; each words its own message for where the value came from.
    """
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )


def check_seconds(
    name: str,
    value: object,
    *,
    allow_zero: bool,
    at_most: float | None = None,
    why: str = "",
) -> float:
    if not is_seconds(value, allow_zero=allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise ConfigurationError(
            f"{name}={shown(value)} must be a finite number of seconds, {bound} (e.g. {name}=2.0)"
        )
    seconds = float(value)  # type: ignore[arg-type]
    if at_most is not None and seconds > at_most:
        raise ConfigurationError(
            f"{name}={shown(value)} is too long: at most {at_most} seconds, because {why}"
        )
    return seconds


def check_busy_timeout(value: object) -> float:
    """``sqlite_busy_timeout``: seconds SQLite waits for another process's write lock."""
    return check_seconds(
        "sqlite_busy_timeout",
        value,
        allow_zero=True,
        at_most=MAX_SQLITE_BUSY_TIMEOUT,
        why="SQLite takes it as a 32-bit count of milliseconds, and a larger value wraps "
        "around (to 0: a locked database would fail at once instead of waiting)",
    )
