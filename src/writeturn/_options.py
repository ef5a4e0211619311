"""A serializer's options, each checked once, with errors that name the value and the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigurationError

__all__ = [
    "Coordination",
    "Options",
    "DEFAULT_KEY",
    "check_key",
    "check_writer",
    "check_idempotency_key",
    "check_retries",
    "check_seconds",
]

Coordination = Literal["turn", "advisory"]
COORDINATIONS = ("turn", "advisory")
DEFAULT_KEY = ""  # key=None: one serializer-wide key


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
                f"coordination={self.coordination!r} is not a coordination mode; use 'advisory' "
                "(database locks, safe across processes) or 'turn' (this process is the only "
                "writer)"
            )
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigurationError(
                f"namespace={self.namespace!r} must be a non-empty string, "
                "e.g. namespace='myservice'"
            )
        check_seconds("cancel_grace", self.cancel_grace, allow_zero=True)
        if not _whole(self.batch_max) or self.batch_max < 1:
            raise ConfigurationError(
                f"batch_max={self.batch_max!r} must be a whole number of writes, 1 or more "
                "(1 turns group commit off; e.g. batch_max=64)"
            )
        check_seconds("batch_window", self.batch_window, allow_zero=True)
        check_retries(self.retries)
        if self.max_queue is not None and (not _whole(self.max_queue) or self.max_queue < 1):
            raise ConfigurationError(
                f"max_queue={self.max_queue!r} must be a whole number of writes, 1 or more, or "
                "None (no limit)"
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
            f"key must be a non-empty string or None, got {key!r}; name what the write "
            "protects, e.g. key=f'account:{account_id}'"
        )
    return key


def check_writer(writer: object) -> str | None:
    if writer is not None and not isinstance(writer, str):
        raise ConfigurationError(
            f"writer must be a string naming who writes (e.g. writer='billing') or None, "
            f"got {writer!r}"
        )
    return writer


def check_idempotency_key(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 500:
        raise ConfigurationError(
            f"idempotency_key must be a non-empty string of at most 500 characters, got "
            f"{value!r}; use a request id, e.g. idempotency_key=f'payment:{{request_id}}'"
        )
    return value


def check_retries(value: object) -> int:
    if not _whole(value) or value < 0:  # type: ignore[operator]
        raise ConfigurationError(
            f"retries={value!r} must be a whole number, 0 or more (e.g. retries=3)"
        )
    return value  # type: ignore[return-value]


def check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = "zero or more" if allow_zero else "more than zero"
        raise ConfigurationError(
            f"{name}={value!r} must be a finite number of seconds, {bound} (e.g. {name}=2.0)"
        )
    return float(value)  # type: ignore[arg-type]
