"""The serializer: fair, ordered, cancellation-safe writes through one AsyncEngine."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Concatenate, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import journal
from ._batch import BatchRun
from ._options import (
    Coordination,
    Options,
    check_idempotency_key,
    check_key,
    check_retries,
    check_seconds,
    check_writer,
)
from ._runtime import Runtime, holds_turn
from ._session import WriteSession
from ._worker import SingleRun, TransactionContext
from ._write import Stop, WriteRecord
from .dialects import configure_sqlite_engine
from .errors import (
    ConfigurationError,
    DatabaseUnreachable,
    JournalMissing,
    QueueFull,
    ReentrantWriteError,
    SerializerClosed,
    SerializerNotStarted,
)
from .handle import WriteHandle
from .outcome import Outcome
from .stats import SerializerStats
from .turnlock import KeyStatistics
from .urls import backend_of, describe_error, normalize_url, redact

__all__ = ["WriteSerializer", "TransactionContext"]

log = logging.getLogger("writeturn")

T = TypeVar("T")


class WriteSerializer:
    """Per key, one write at a time, in fair turns; a cancelled write always rolls back cleanly.

    Guarantees (each one tested against the real database):

    1. Mutual exclusion: per key, at most one write transaction is in progress
       at a time: among this process's tasks (``coordination="turn"``), or
       among all processes sharing the database (``"advisory"``).
    2. Order: per (key, writer), writes start in submission order.
    3. Alternation: per key, turns rotate round-robin among writers with
       pending writes; ``writer=None`` makes each write its own writer.
    4. Clean hand-over: a turn passes on only after COMMIT or ROLLBACK was
       acknowledged (or the connection was discarded).
    5. Cancellation: queued, the write is WITHDRAWN and never runs; running,
       it is rolled back to completion, then the turn passes (ROLLED_BACK);
       committing, the commit finishes and the outcome says what happened;
       then the cancellation propagates. ``asyncio.timeout`` around any call
       still raises ``TimeoutError``.
    6. Outcome truth: ``outcome == COMMITTED`` iff the effects are in the database.
    7. Re-entrancy: a write on a key whose turn this task holds raises
       :class:`ReentrantWriteError` at once (on SQLite: any key, since SQLite
       has one writer).
    8. Timeouts: ``timeout`` bounds the whole write, waiting included, and
       raises :class:`TurnTimeout` (WITHDRAWN if still queued, else ROLLED_BACK).

    Example::

        async with WriteSerializer.from_url("sqlite:///app.db") as ser:
            async def deposit(session, account, amount):
                await session.execute(update(...).values(balance=... + amount))
            await ser.run(deposit, 42, 10, key="account:42", writer="billing")

    Use from one event loop. ``WriteSerializer(engine)`` borrows the engine and
    never disposes it; :meth:`from_url` creates and owns one.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        coordination: Coordination = "advisory",
        namespace: str = "writeturn",
        cancel_grace: float = 0.05,
        journal: bool = False,
        batch_max: int = 1,
        batch_window: float = 0.0,
        retries: int = 0,
        retry_backoff: float = 0.05,
        max_queue: int | None = None,
        cleanup_timeout: float = 5.0,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"WriteSerializer needs an AsyncEngine, got {type(engine).__name__}; create one "
                "with sqlalchemy.ext.asyncio.create_async_engine(url), or use "
                "WriteSerializer.from_url(url)"
            )
        self._rt = Runtime(
            engine,
            Options(
                coordination=coordination,
                namespace=namespace,
                cancel_grace=cancel_grace,
                journal=bool(journal),
                batch_max=batch_max,
                batch_window=batch_window,
                retries=retries,
                retry_backoff=retry_backoff,
                max_queue=max_queue,
                cleanup_timeout=cleanup_timeout,
            ),
        )
        self._owns_engine = False
        self._closing: asyncio.Task[None] | None = None
        # One bound method for every write, not one per queued write (64 bytes each).
        self._on_grant: Callable[[WriteRecord], None] = self._start

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        coordination: Coordination = "advisory",
        namespace: str = "writeturn",
        sqlite_synchronous: str | None = None,
        sqlite_busy_timeout: float = 5.0,
        cancel_grace: float = 0.05,
        journal: bool = False,
        batch_max: int = 1,
        batch_window: float = 0.0,
        retries: int = 0,
        retry_backoff: float = 0.05,
        max_queue: int | None = None,
        cleanup_timeout: float = 5.0,
        **engine_options: Any,
    ) -> WriteSerializer:
        """Create a serializer with an engine of its own, disposed by :meth:`close`.

        Accepts ``sqlite+aiosqlite://`` and ``postgresql+asyncpg://`` URLs (plain
        ``sqlite://`` and ``postgresql://`` are mapped to those drivers). SQLite
        files get WAL, foreign keys, a busy timeout of ``sqlite_busy_timeout``
        seconds and ``synchronous=sqlite_synchronous`` (NORMAL by default;
        FULL makes every COMMIT durable against power loss, at the cost of a
        flush each). ``engine_options`` go to ``create_async_engine``.
        """
        parsed = normalize_url(url)
        backend = backend_of(parsed)
        if backend != "sqlite" and sqlite_synchronous is not None:
            raise ConfigurationError(
                f"sqlite_synchronous={sqlite_synchronous!r} applies to SQLite only, and "
                f"{redact(parsed)} is {backend}; drop the option"
            )
        busy = check_seconds("sqlite_busy_timeout", sqlite_busy_timeout, allow_zero=True)
        engine = create_async_engine(parsed, **engine_options)
        if backend == "sqlite":
            configure_sqlite_engine(
                engine, synchronous=sqlite_synchronous or "NORMAL", busy_timeout=busy
            )
        try:
            ser = cls(
                engine,
                coordination=coordination,
                namespace=namespace,
                cancel_grace=cancel_grace,
                journal=journal,
                batch_max=batch_max,
                batch_window=batch_window,
                retries=retries,
                retry_backoff=retry_backoff,
                max_queue=max_queue,
                cleanup_timeout=cleanup_timeout,
            )
        except BaseException:
            engine.sync_engine.dispose()
            raise
        ser._owns_engine = True
        return ser

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Check that the database answers, and accept writes. Idempotent."""
        rt = self._rt
        if rt.state == "started":
            return
        if rt.state != "new":
            raise SerializerClosed(
                "this WriteSerializer is closed; create a new one instead of restarting it"
            )
        try:
            async with rt.engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                if rt.options.journal:
                    await journal.check_table(conn)
                await conn.rollback()
        except JournalMissing:
            raise
        except Exception as exc:
            url = rt.engine.url
            hint = (
                "check that the file's directory exists and is writable, and that the file, "
                "if it exists, is a SQLite database"
                if rt.gate is not None
                else "check that the server runs and the URL is right"
            )
            raise DatabaseUnreachable(
                f"cannot reach {redact(url)}: {describe_error(exc, url)}; {hint}"
            ) from None
        rt.state = "started"

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting writes, settle the ones in flight, and dispose an owned engine.

        ``drain=True`` lets queued writes run (for at most ``timeout`` seconds,
        if given, after which the rest are stopped as with ``drain=False``).
        ``drain=False`` withdraws queued writes (WITHDRAWN) and rolls back
        running ones (ROLLED_BACK); both then raise :class:`SerializerClosed`.
        A write whose COMMIT is already in flight is not cut off: it ends as
        the database decides (guarantee 5). Idempotent, and safe to cancel: the
        close goes on, and every later call waits for it to finish. Refused
        (:class:`ReentrantWriteError`) inside a write of this serializer, which
        it would wait for forever.
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout, allow_zero=True)
        held = holds_turn(self._rt, inside=True)
        if held is not None:
            raise ReentrantWriteError(
                f"close() called inside a write on key {held!r} of this serializer would wait "
                "for that write forever; close the serializer after the write, from outside it"
            )
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(drain, timeout))
        elif not drain:
            self._stop_all()
        # Shielded: a cancelled close() leaves the close running, and the next
        # close() waits for the same one.
        await asyncio.shield(self._closing)

    async def _close(self, drain: bool, timeout: float | None) -> None:
        rt = self._rt
        rt.state = "closing"
        try:
            if not drain:
                self._stop_all()
            elif timeout is not None:
                try:
                    await asyncio.wait_for(rt.idle.wait(), timeout)
                except TimeoutError:
                    self._stop_all()
            await rt.idle.wait()
            # A batch settles its writes before it hands its connection back:
            # it must end before the engine is disposed, or its connection stays open.
            while rt.background:
                await asyncio.wait(set(rt.background))
        finally:
            await rt.connections.close()
            if self._owns_engine:
                await rt.engine.dispose()
            rt.state = "closed"

    def _stop_all(self) -> None:
        for record in list(self._rt.live):
            record.request_stop(Stop.CLOSE)

    async def __aenter__(self) -> WriteSerializer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(drain=exc_type is None)

    # -- writing -----------------------------------------------------------------

    def transaction(
        self, *, key: str | None = None, writer: str | None = None, timeout: float | None = None
    ) -> TransactionContext:
        """Wait for the turn on ``key``, then run the block in one transaction on a session.

        The block gets a :class:`WriteSession` (an AsyncSession): it commits
        when the block exits cleanly and rolls back when it raises or is
        cancelled. The write's handle is ``ctx.handle``. Example::

            async with ser.transaction(key="account:42", writer="billing") as session:
                await session.execute(...)
        """
        record = self._new_record(None, (), None, key, writer, timeout, None)
        return TransactionContext(self._rt, record, WriteHandle[None](record))

    def submit(
        self,
        fn: Callable[Concatenate[WriteSession, ...], Awaitable[T]],
        /,
        *args: Any,
        key: str | None = None,
        writer: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> WriteHandle[T]:
        """Queue ``fn(session, *args, **kwargs)`` for one transaction; return its handle at once.

        The write takes its turn on ``key`` (None: one serializer-wide key) as
        ``writer`` (None: its own writer). ``timeout`` bounds the whole write, waiting
        included. With an ``idempotency_key`` the write is journaled: if a
        write with the same key already committed (in any process), ``fn``
        does not run and the handle completes COMMITTED with
        ``handle.duplicate`` True, so retrying after a timeout, a crash or an
        UNKNOWN outcome applies the write exactly once. ``retries`` (default:
        the serializer's) runs ``fn`` again, in the same turn, after a
        transient failure: a serialization failure or deadlock, a connection
        lost with the outcome known to be ROLLED_BACK, SQLite busy from
        another process; an UNKNOWN outcome only with an idempotency key.
        Awaiting the handle returns ``fn``'s result once the transaction
        committed (None for a duplicate, whose ``fn`` did not run).
        """
        if not callable(fn):
            raise ConfigurationError(
                f"submit() needs an async function taking the session first, got {fn!r}"
            )
        record = self._new_record(fn, args, kwargs or None, key, writer, timeout, idempotency_key)
        record.retries = self._rt.options.retries if retries is None else check_retries(retries)
        record.context = contextvars.copy_context()
        self._rt.enter(record)
        record.arm(on_grant=self._on_grant)
        if self._rt.turns.enqueue(record.key, record):
            record.on_grant()
        return WriteHandle(record)

    async def run(
        self,
        fn: Callable[Concatenate[WriteSession, ...], Awaitable[T]],
        /,
        *args: Any,
        key: str | None = None,
        writer: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> T:
        """Submit ``fn`` and await its result: ``await ser.submit(...)`` in one call."""
        return await self.submit(
            fn,
            *args,
            key=key,
            writer=writer,
            timeout=timeout,
            idempotency_key=idempotency_key,
            retries=retries,
            **kwargs,
        )

    async def outcome_of(self, idempotency_key: str) -> Outcome | None:
        """COMMITTED if a write with ``idempotency_key`` committed (in any process), else None.

        Reads the journal; raises :class:`JournalMissing` if its table was never created.
        """
        ik = check_idempotency_key(idempotency_key)
        async with self._rt.engine.connect() as conn:
            seq = await journal.lookup(conn, self._rt.options.namespace, ik)
            await conn.rollback()
        return None if seq is None else Outcome.COMMITTED

    # -- introspection -------------------------------------------------------------

    def stats(self) -> SerializerStats:
        """A snapshot of the counters (see :class:`SerializerStats`)."""
        rt = self._rt
        queued = rt.turns.statistics().waiting
        return rt.counters.snapshot(queued=queued, running=len(rt.live) - queued)

    def observe(self, observer: Callable[[str, float], None]) -> Callable[[], None]:
        """Call ``observer(kind, seconds)`` for every wait (``"wait"``: submission to
        turn) and hold (``"hold"``: turn to settle) the serializer records, in the
        event loop, synchronously; return a function that stops it. An observer that
        raises is logged and never fails a write. (:mod:`writeturn.metrics` uses this.)
        """
        observers = self._rt.counters.observers
        observers.append(observer)

        def stop() -> None:
            if observer in observers:
                observers.remove(observer)

        return stop

    def key_statistics(self, key: str | None = None) -> KeyStatistics:
        """Who holds ``key``'s turn and which writers wait, in turn order."""
        return self._rt.turns.key_statistics(check_key(key))

    @property
    def engine(self) -> AsyncEngine:
        """The engine writes go through (readers may use it directly)."""
        return self._rt.engine

    @property
    def coordination(self) -> Coordination:
        return self._rt.options.coordination

    @property
    def namespace(self) -> str:
        return self._rt.options.namespace

    def __repr__(self) -> str:
        s = self.stats()
        rt = self._rt
        return (
            f"<WriteSerializer {redact(rt.engine.url)} coordination={rt.options.coordination} "
            f"{rt.state} queued={s.queued} running={s.running}>"
        )

    # -- internals -------------------------------------------------------------------

    def _new_record(
        self,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        key: object,
        writer: object,
        timeout: object,
        idempotency_key: object,
    ) -> WriteRecord:
        rt = self._rt
        if rt.state != "started":
            if rt.state == "new":
                raise SerializerNotStarted()
            raise SerializerClosed(f"this WriteSerializer is {rt.state}; it accepts no new writes")
        k = check_key(key)
        w = check_writer(writer)
        seconds = None if timeout is None else check_seconds("timeout", timeout, allow_zero=False)
        ik = None if idempotency_key is None else check_idempotency_key(idempotency_key)
        self._check_reentrant(k)
        max_queue = rt.options.max_queue
        if max_queue is not None and rt.turns.waiting(k) >= max_queue:
            raise QueueFull(
                f"{max_queue} writes already wait for key {k!r} (max_queue={max_queue}); nothing "
                "was queued. Slow down and retry later, or raise max_queue; a database that is "
                "down makes writes fail fast, so a full queue usually means writes arrive faster "
                "than the database commits them"
            )
        return WriteRecord(
            rt,
            rt.counters,
            k,
            w,
            fn,
            args,
            kwargs,
            timeout=seconds,
            idempotency_key=ik,
            journaled=rt.options.journal or ik is not None,
        )

    def _check_reentrant(self, key: str) -> None:
        held = holds_turn(self._rt, key)
        if held is not None:
            where = (
                "SQLite has a single writer, so any write"
                if self._rt.gate is not None and held != key
                else f"a write on key {key!r}"
            )
            raise ReentrantWriteError(
                f"{where} started inside this task's turn on key {held!r} would wait for "
                "that turn forever; do the work in the same transaction (use the session "
                "you already have), or start the write after the turn ends"
            )

    def _start(self, record: WriteRecord) -> None:
        """The write's turn came: run it, alone or with the writes queued behind it."""
        if self._rt.options.batch_max > 1:
            BatchRun(self._rt, record)
        else:
            SingleRun(self._rt, record)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
