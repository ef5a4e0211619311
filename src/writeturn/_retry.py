"""The retry policy: whether a write that did not commit runs again, and after how long.

A write runs again only where another attempt can change the answer and
cannot apply it twice: a transient failure the database rolled back (its
connection died, a serialization failure, a deadlock, SQLite busy past its
timeout), a COMMIT whose fate is unknown when the write has an idempotency
key (its journal row then tells a later attempt whether it landed), or a
database that could not be reached before the write began. The runners ask
:func:`retry_delay` as each attempt ends; the write keeps its turn while it
waits.

# Invariants:
# - a write runs again only if it has a function (not a ``transaction()`` block),
#   was not stopped and has retries left;
# - a write whose COMMIT's fate is unknown runs again only with an idempotency key;
# - each retry counts one attempt on the record and one in ``counters.retries``;
# - the back-off is ``backoff * 2 ** (attempt - 1)``, scaled by a random 0.5 to 1.5.
"""

from __future__ import annotations

import logging
import random

from ._error_kinds import ErrorKind, classify
from ._write import State, WriteRecord
from .errors import ConnectionLost, DatabaseUnreachable
from .outcome import Outcome
from .stats import Counters

__all__ = ["retry_delay"]

log = logging.getLogger("writeturn")


def retry_delay(
    record: WriteRecord,
    outcome: Outcome,
    error: BaseException | None,
    *,
    dialect: str,
    backoff: float,
    counters: Counters,
) -> float | None:
    """The back-off before running ``record`` again, or None if it must not run again.

    Only a transient failure with retries left is retried, and only for a
    write that was not stopped; an UNKNOWN outcome only with an idempotency
    key (the journal then applies the write at most once). ``dialect`` names
    the database (``engine.dialect.name``), ``backoff`` is the options'
    ``retry_backoff``, and a retry is counted in ``counters``.
    """
    if (
        error is None
        or record.fn is None
        or record.stop is not None
        or record.attempts >= record.retries
    ):
        return None
    if record.state not in (State.ROLLING_BACK, State.COMMITTING):
        # It did not begin: only a database that could not be reached is worth
        # another try (a retry after a COMMIT whose fate was unknown meets it).
        if not isinstance(error, DatabaseUnreachable):
            return None
    elif outcome is Outcome.UNKNOWN:
        if record.idempotency_key is None:
            return None
    elif outcome is not Outcome.ROLLED_BACK or not _worth_retrying(dialect, error):
        return None
    attempt = record.count_attempt()
    delay = backoff * 2 ** (attempt - 1)
    log.info(
        "writeturn: retrying the write on key %r (attempt %d of %d) in %.3fs after %s",
        record.key,
        attempt,
        record.retries,
        delay,
        type(error).__name__,
    )
    counters.retries += 1
    return float(delay * random.uniform(0.5, 1.5))


def _worth_retrying(dialect: str, error: BaseException) -> bool:
    """A write that rolled back with ``error`` may succeed if run again: its connection
    died, the database gave up on it for now (serialization failure, deadlock, busy),
    or BEGIN found its connection dead and no fresh one could be had (a server
    shutting down at a failover: DatabaseUnreachable)."""
    if isinstance(error, DatabaseUnreachable):
        return True
    return bool(classify(dialect, _root(error)) & (ErrorKind.LOST | ErrorKind.TRANSIENT))


def _root(error: BaseException) -> BaseException:
    """The driver error under a ConnectionLost."""
    if isinstance(error, ConnectionLost) and error.__cause__ is not None:
        return error.__cause__
    return error
