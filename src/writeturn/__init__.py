"""writeturn: fair, ordered, cancellation-safe concurrent database writes for asyncio.

Writers take fair turns per key (A, B, A, B), every transaction rolls back
cleanly when its task is cancelled, and every write reports its outcome
truthfully. Coordination is in-process (``"turn"``) or through database
advisory locks (``"advisory"``), over SQLAlchemy's async engine on SQLite
(aiosqlite) or Postgres (asyncpg).
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

from ._session import WriteSession
from .errors import (
    ConfigurationError,
    ConnectionLost,
    DatabaseUnreachable,
    IdempotencyKeyReused,
    JournalMissing,
    OutcomeUnknown,
    PoolExhausted,
    QueueFull,
    ReentrantWriteError,
    SerializerClosed,
    SerializerNotStarted,
    TransactionAborted,
    TransactionOwnedError,
    TurnTimeout,
    UnsupportedDatabase,
    WriteturnError,
)
from .handle import WriteHandle
from .outcome import Outcome
from .serializer import TransactionContext, WriteSerializer
from .stats import SerializerStats
from .turnlock import KeyStatistics, TurnLock, TurnLockStatistics

__all__ = [
    "WriteSerializer",
    "TurnLock",
    "WriteHandle",
    "Outcome",
    "WriteSession",
    "TransactionContext",
    "SerializerStats",
    "KeyStatistics",
    "TurnLockStatistics",
    "WriteturnError",
    "ConfigurationError",
    "UnsupportedDatabase",
    "SerializerClosed",
    "SerializerNotStarted",
    "ReentrantWriteError",
    "TurnTimeout",
    "OutcomeUnknown",
    "TransactionOwnedError",
    "DatabaseUnreachable",
    "ConnectionLost",
    "JournalMissing",
    "IdempotencyKeyReused",
    "QueueFull",
    "PoolExhausted",
    "TransactionAborted",
]

try:  # the version is written once, in pyproject.toml
    __version__: str = _distribution_version("writeturn")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

# A library stays silent unless the application configures logging: without a
# handler of its own, a WARNING would reach stderr through logging.lastResort.
logging.getLogger("writeturn").addHandler(logging.NullHandler())
