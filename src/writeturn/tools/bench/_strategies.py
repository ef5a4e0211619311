"""The strategies compared: one class each, behind :class:`Strategy`.

Baselines (``raw``, ``bulk``) run all the writes of a cell one after another
on one connection, ignoring the writers' concurrency: they are the floor and
the ceiling of what one connection can do. The others receive concurrent
``write(op)`` calls from many tasks, the way a service's request handlers
would make them; cancelling a write means cancelling the task that made the
call.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)

from ..._engines import SqlitePragmas, create_engine
from ...outcome import Outcome
from ...serializer import WriteSerializer
from ._workloads import Apply, Op

__all__ = [
    "Database",
    "Strategy",
    "StrategyStats",
    "make_strategy",
    "make_engine",
    "batch_support",
    "BATCH_OPTIONS",
    "NAIVE_ATTEMPTS",
]

#: Group commit options for the ``batch`` strategy.
BATCH_OPTIONS: dict[str, Any] = {"batch_max": 64, "batch_window": 0.002}
#: How many times ``naive`` tries a write that failed with a lock or serialization error.
NAIVE_ATTEMPTS = 5
SQLITE_BUSY_TIMEOUT = 5.0

#: (done time) per write, in the order the writes ran: what a baseline returns.
Timings = list[tuple[float, float]]


@dataclass(frozen=True)
class Database:
    """One database the bench runs on: a label for tables, the URL, and SQLite's sync level."""

    label: str
    url: URL
    backend: str
    synchronous: str | None


@dataclass(frozen=True)
class StrategyStats:
    extra_errors: int
    connections_invalidated: int
    connections_leaked: int


#: How long a strategy's connections get to go back to the pool after its last write.
SETTLE_SECONDS = 0.05


class PoolWatch:
    """Counts an engine's invalidated connections, checkouts and checkins."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.invalidated = self.checkouts = self.checkins = 0
        target = engine.sync_engine
        event.listen(target, "invalidate", self._invalidate)
        event.listen(target, "checkout", self._checkout)
        event.listen(target, "checkin", self._checkin)

    def _invalidate(self, *_: Any) -> None:
        self.invalidated += 1

    def _checkout(self, *_: Any) -> None:
        self.checkouts += 1

    def _checkin(self, *_: Any) -> None:
        self.checkins += 1

    def never_returned(self) -> int:
        """Connections checked out and not checked in (read after shutting down)."""
        return max(0, self.checkouts - self.checkins)

    async def leaked(self) -> int:
        """Connections still checked out once the writes are over (call before disposing)."""
        await asyncio.sleep(SETTLE_SECONDS)
        return int(self.engine.pool.checkedout())  # type: ignore[attr-defined]


def make_engine(db: Database, **options: Any) -> AsyncEngine:
    """An engine made the way writeturn makes its own (the URL's libpq parameters
    mapped; on SQLite WAL, busy timeout, sync): by the same function."""
    pragmas = SqlitePragmas(db.synchronous or "NORMAL", SQLITE_BUSY_TIMEOUT)
    return create_engine(db.url, options, sqlite_pragmas=pragmas)


def batch_support() -> str | None:
    """How this writeturn accepts group commit: "from_url", "init", or None (not at all)."""
    if "batch_max" in inspect.signature(WriteSerializer.from_url).parameters:
        return "from_url"
    if "batch_max" in inspect.signature(WriteSerializer.__init__).parameters:
        return "init"
    return None


class Strategy:
    """How writes reach the database. Concurrent strategies implement :meth:`write`;
    baselines implement :meth:`run_all`."""

    name: ClassVar[str]
    baseline: ClassVar[bool] = False

    def __init__(self, db: Database, apply: Apply, rng: random.Random) -> None:
        self.db = db
        self.apply = apply
        self.rng = rng
        self.extra_errors = 0

    def unavailable(self) -> str | None:
        """Why this strategy cannot run here (None: it can)."""
        return None

    async def open(self) -> None:
        raise NotImplementedError

    async def write(self, op: Op) -> None:
        """Perform one write; return once it committed, raise if it did not."""
        raise NotImplementedError

    async def run_all(self, ops: list[Op]) -> Timings:
        """Baselines: perform every write; return (submitted, done) times per write."""
        raise NotImplementedError

    async def close(self) -> StrategyStats:
        raise NotImplementedError


class EngineStrategy(Strategy):
    """A strategy on an engine of its own, with invalidated connections counted."""

    def __init__(self, db: Database, apply: Apply, rng: random.Random) -> None:
        super().__init__(db, apply, rng)
        self._engine: AsyncEngine | None = None
        self._watch: PoolWatch | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @property
    def engine(self) -> AsyncEngine:
        assert self._engine is not None, "open() first"
        return self._engine

    async def open(self) -> None:
        self._engine = make_engine(self.db)
        self._watch = PoolWatch(self._engine)
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        async with self._engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
            await conn.rollback()

    async def transaction(self, op: Op) -> None:
        """``op`` in a transaction on a session of its own."""
        assert self._sessions is not None
        async with self._sessions() as session, session.begin():
            await self.apply(session, op)

    async def close(self) -> StrategyStats:
        assert self._watch is not None
        leaked = await self._watch.leaked()
        await self.engine.dispose()
        return StrategyStats(self.extra_errors, self._watch.invalidated, leaked)


class Raw(EngineStrategy):
    """One connection, one transaction per write, sequential, no coordination."""

    name = "raw"
    baseline = True

    async def run_all(self, ops: list[Op]) -> Timings:
        out: Timings = []
        async with self.engine.connect() as conn:
            session = AsyncSession(bind=conn, expire_on_commit=False)
            for op in ops:
                t0 = time.perf_counter()
                async with session.begin():
                    await self.apply(session, op)
                out.append((t0, time.perf_counter()))
            await session.close()
        return out


class Bulk(EngineStrategy):
    """Every write's statements back to back in one transaction: the group-commit ceiling."""

    name = "bulk"
    baseline = True

    async def run_all(self, ops: list[Op]) -> Timings:
        t0 = time.perf_counter()
        async with self.engine.connect() as conn:
            session = AsyncSession(bind=conn, expire_on_commit=False)
            async with session.begin():
                for op in ops:
                    await self.apply(session, op)
            await session.close()
        t1 = time.perf_counter()
        return [(t0, t1)] * len(ops)


def _retryable(exc: DBAPIError) -> bool:
    """SQLite "database is locked" (SQLITE_BUSY); Postgres serialization failure or deadlock."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code is None and orig is not None and orig.__cause__ is not None:
        code = getattr(orig.__cause__, "sqlstate", None)
    if code in ("40001", "40P01"):
        return True
    text = str(orig).lower()
    return "database is locked" in text or "database is busy" in text


class Naive(EngineStrategy):
    """Concurrent sessions from the pool, no coordination; retries lock and
    serialization errors up to :data:`NAIVE_ATTEMPTS` times, counting each."""

    name = "naive"

    async def write(self, op: Op) -> None:
        for attempt in range(1, NAIVE_ATTEMPTS + 1):
            try:
                await self.transaction(op)
                return
            except DBAPIError as exc:
                if attempt == NAIVE_ATTEMPTS or not _retryable(exc):
                    raise
                self.extra_errors += 1
                await asyncio.sleep(self.rng.uniform(0, 0.002 * attempt))


class LockStrategy(EngineStrategy):
    """An ``asyncio.Lock`` around each write's session transaction."""

    name = "lock"

    async def open(self) -> None:
        await super().open()
        self._lock = asyncio.Lock()

    async def write(self, op: Op) -> None:
        async with self._lock:
            await self.transaction(op)


class SemaphoreStrategy(EngineStrategy):
    """``asyncio.Semaphore(1)`` around each write's session transaction."""

    name = "semaphore"

    async def open(self) -> None:
        await super().open()
        self._sem = asyncio.Semaphore(1)

    async def write(self, op: Op) -> None:
        async with self._sem:
            await self.transaction(op)


_Item = tuple[Op, "asyncio.Future[None]"] | None


class QueueStrategy(EngineStrategy):
    """One consumer task fed by an ``asyncio.Queue``; each producer awaits a future.

    A write whose producer was cancelled before the consumer reached it is
    skipped; one already running runs on (the producer has gone).
    """

    name = "queue"

    async def open(self) -> None:
        await super().open()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._consumer = asyncio.create_task(self._consume())

    async def write(self, op: Op) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fut))
        await fut

    async def _consume(self) -> None:
        while (item := await self._queue.get()) is not None:
            op, fut = item
            if fut.done():
                continue
            try:
                await self.transaction(op)
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(None)

    async def close(self) -> StrategyStats:
        self._queue.put_nowait(None)
        await self._consumer
        return await super().close()


class WriteturnStrategy(Strategy):
    """writeturn's :class:`WriteSerializer`; a write's claim is its handle's outcome."""

    coordination: ClassVar[str] = "turn"
    options: ClassVar[dict[str, Any]] = {}

    async def open(self) -> None:
        self.ser = self._build()
        self._watch = PoolWatch(self.ser.engine)
        await self.ser.start()

    def _build(self) -> WriteSerializer:
        return WriteSerializer.from_url(
            self.db.url,
            coordination=self.coordination,  # type: ignore[arg-type]
            sqlite_synchronous=self.db.synchronous,
            **self.options,
        )

    async def write(self, op: Op) -> None:
        handle = self.ser.submit(self.apply, op, key=op.key, writer=f"w{op.writer}")
        try:
            await handle
        finally:
            op.claim = handle.outcome is Outcome.COMMITTED

    async def close(self) -> StrategyStats:
        # writeturn parks up to two connections between writes and returns
        # them at close(): count what close() did not return.
        await self.ser.close()
        stats = self.ser.stats()
        return StrategyStats(0, stats.connections_invalidated, self._watch.never_returned())


class Turn(WriteturnStrategy):
    name = "turn"
    coordination = "turn"


class Advisory(WriteturnStrategy):
    name = "advisory"
    coordination = "advisory"


class Batch(WriteturnStrategy):
    """Group commit: ``batch_max=64, batch_window=0.002`` (turn coordination)."""

    name = "batch"
    coordination = "turn"
    options = BATCH_OPTIONS

    def unavailable(self) -> str | None:
        if batch_support() is None:
            return "this writeturn has no group commit (WriteSerializer takes no batch_max)"
        return None

    def _build(self) -> WriteSerializer:
        if batch_support() == "from_url":
            return super()._build()
        self._engine: AsyncEngine | None = make_engine(self.db)
        return WriteSerializer(self._engine, coordination="turn", **self.options)

    async def close(self) -> StrategyStats:
        stats = await super().close()
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:  # a borrowed engine: WriteSerializer.close() leaves it open
            await engine.dispose()
        return stats


_CLASSES: tuple[type[Strategy], ...] = (
    Raw,
    Bulk,
    Naive,
    LockStrategy,
    QueueStrategy,
    SemaphoreStrategy,
    Turn,
    Advisory,
    Batch,
)
STRATEGY_CLASSES: dict[str, type[Strategy]] = {c.name: c for c in _CLASSES}


def make_strategy(name: str, db: Database, apply: Apply, rng: random.Random) -> Strategy:
    cls: Callable[[Database, Apply, random.Random], Strategy] = STRATEGY_CLASSES[name]
    return cls(db, apply, rng)
