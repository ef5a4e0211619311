"""What all writes of one serializer share: engine, dialect, options, turns, counters.

The runtime is handed down to the transaction, batch and worker layers; it
never calls up into them. It is also the :class:`~writeturn._write.Owner` of
every write record: records withdraw, hand turns on and report their end
through it, and nothing else.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from . import _error_kinds, _owned
from ._connections import ConnectionCache
from ._lifecycle import Lifecycle
from ._options import Options
from ._write import WriteRecord
from .dialects import Dialect, dialect_for
from .errors import ConfigurationError
from .stats import Counters
from .turnlock import TurnLock

__all__ = ["Runtime", "HELD", "GATE_KEY", "holds_turn"]

GATE_KEY = ""  # the one key of SQLite's database-wide write gate

# The turns the current task holds: (runtime, key, task) triples. A copied
# context (a task a holder spawned) inherits the value, so the task is kept too.
HELD: ContextVar[tuple[tuple[Runtime, str, asyncio.Task[Any]], ...]] = ContextVar(
    "writeturn_held", default=()
)


def holds_turn(rt: Runtime, key: str | None = None, *, inside: bool = False) -> str | None:
    """The key (of ``rt``) whose turn the current task holds, or None.

    With ``key``, only that key counts, except on SQLite, where any held turn
    does (one writer per database). With ``inside``, a turn also counts when
    the current task was started inside it (its context was copied there,
    e.g. by ``wait_for``), the turn's holder is still running and the key's
    turn is still taken: a ``transaction()`` block's holder is the caller's
    task, which runs on after the block has handed its turn on.
    """
    marks = HELD.get()
    if not marks:
        return None  # the common case: no turn held anywhere up this task's line
    task = asyncio.current_task()
    for owner, held, holder in marks:
        if owner is not rt or not (key is None or held == key or rt.gate):
            continue
        if holder is task:
            return held
        if inside and not holder.done() and rt.turns.key_statistics(held).held:
            return held
    return None


class Runtime:
    """The shared state of one serializer's writes (the serializer's engine room)."""

    __slots__ = (
        "engine",
        "dialect",
        "options",
        "turns",
        "gate",
        "counters",
        "connections",
        "live",
        "out_of_line",
        "idle",
        "background",
        "lifecycle",
    )

    def __init__(self, engine: AsyncEngine, options: Options) -> None:
        _refuse_autocommit(engine)
        self.engine = engine
        self.options = options
        self.dialect: Dialect = dialect_for(engine, options.coordination, options.namespace)
        self.turns = TurnLock()
        # SQLite has one writer per database: writes of different keys also
        # pass one at a time, so they never meet SQLite's own write lock.
        self.gate: TurnLock | None = TurnLock() if self.dialect.single_writer else None
        self.counters = Counters()
        self.connections = ConnectionCache(engine)
        # Writes not yet settled: how many, and those out of their line (the
        # queued ones are in ``turns``). Not a set of them all: a set's slot
        # would cost every queued write a fifth of its memory.
        self.live = 0
        self.out_of_line: set[WriteRecord] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        # Batch runs and start()'s check of the database: close() waits for them to
        # hand their connections back.
        self.background: set[asyncio.Task[None]] = set()
        # The serializer's phase (new, started, closing, closed): see _lifecycle.
        self.lifecycle = Lifecycle()
        _owned.install(engine)
        _error_kinds.install(engine)

    # -- the Owner interface of write records ------------------------------------

    def withdraw(self, record: WriteRecord) -> bool:
        return self.turns.withdraw(record.key, record)

    def release(self, key: str) -> None:
        self.turns.release(key)

    def running(self, record: WriteRecord) -> None:
        self.out_of_line.add(record)

    def forget(self, record: WriteRecord) -> None:
        self.out_of_line.discard(record)
        self.live -= 1
        if not self.live:
            self.idle.set()

    @property
    def journal_all(self) -> bool:
        return self.options.journal

    # -- helpers for the layers below ------------------------------------------

    def enter(self, record: WriteRecord) -> None:
        """Count ``record`` as live; it is about to be queued."""
        self.live += 1
        self.idle.clear()

    def unsettled(self) -> list[WriteRecord]:
        """Every write not yet settled: those in line, then those out of it."""
        queued = [w for w in self.turns.waiters() if isinstance(w, WriteRecord)]
        return [*queued, *self.out_of_line]

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a reference to a background task until it ends (close() waits for it)."""
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def _refuse_autocommit(engine: AsyncEngine) -> None:
    level = engine.get_execution_options().get("isolation_level") or getattr(
        engine.dialect, "_on_connect_isolation_level", None
    )
    if isinstance(level, str) and level.upper() == "AUTOCOMMIT":
        raise ConfigurationError(
            "the engine runs in AUTOCOMMIT mode (isolation_level='AUTOCOMMIT'): every "
            "statement would commit on its own, so a write could not be rolled back and its "
            "outcome could not be told; create the engine without isolation_level='AUTOCOMMIT' "
            "(writeturn commits each write itself)"
        )
