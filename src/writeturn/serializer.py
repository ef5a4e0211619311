"""The serializer: fair, ordered, cancellation-safe writes through one AsyncEngine."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from . import journal, urls
from ._batch import BatchRun
from ._transaction import GATE_KEY, RetryWrite, Transaction
from .dialects import Coordination, configure_sqlite_engine, dialect_for
from .errors import (
    ConfigurationError,
    DatabaseUnreachable,
    JournalMissing,
    QueueFull,
    ReentrantWriteError,
    SerializerClosed,
    SerializerNotStarted,
)
from .handle import Reason, State, WriteHandle
from .outcome import Outcome
from .stats import Counters, SerializerStats
from .turnlock import KeyStatistics, TurnLock
from .urls import backend_of, describe_error, normalize_url, redact

__all__ = ["WriteSerializer", "TransactionContext"]

log = logging.getLogger("writeturn")

T = TypeVar("T")

DEFAULT_KEY = ""
_COORDINATIONS = ("turn", "advisory")
# Up to this many connections stay checked out between writes, for at most
# this long: the next write skips the pool (checkout, reset, checkin).
_SPARES = 2
_SPARE_MAX_IDLE = 1.0

# The turns the current task holds: (serializer, key, task) triples. A copied
# context (a task a holder spawned) inherits the value, so the task is kept too.
_HELD: ContextVar[tuple[tuple[WriteSerializer, str, asyncio.Task[Any]], ...]] = ContextVar(
    "writeturn_held", default=()
)


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
        if coordination not in _COORDINATIONS:
            raise ConfigurationError(
                f"coordination={coordination!r} is not a coordination mode; use 'advisory' "
                "(database locks, safe across processes) or 'turn' (this process is the only "
                "writer)"
            )
        if not isinstance(namespace, str) or not namespace:
            raise ConfigurationError(
                f"namespace={namespace!r} must be a non-empty string, e.g. namespace='myservice'"
            )
        self._cancel_grace = _check_seconds("cancel_grace", cancel_grace, allow_zero=True)
        if not isinstance(batch_max, int) or isinstance(batch_max, bool) or batch_max < 1:
            raise ConfigurationError(
                f"batch_max={batch_max!r} must be a whole number of writes, 1 or more "
                "(1 turns group commit off; e.g. batch_max=64)"
            )
        self._batch_max = batch_max
        self._batch_window = _check_seconds("batch_window", batch_window, allow_zero=True)
        self._retries = _check_retries(retries)
        if max_queue is not None and (
            not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1
        ):
            raise ConfigurationError(
                f"max_queue={max_queue!r} must be a whole number of writes, 1 or more, or None "
                "(no limit)"
            )
        self._max_queue = max_queue
        self._cleanup_timeout = _check_seconds("cleanup_timeout", cleanup_timeout, allow_zero=False)
        self._retry_backoff = _check_seconds("retry_backoff", retry_backoff, allow_zero=True)
        self._engine = engine
        self._coordination: Coordination = coordination
        self._namespace = namespace
        self._journal = bool(journal)
        self._dialect = dialect_for(engine, coordination, namespace)
        self._owns_engine = False
        self._turns = TurnLock()
        # SQLite has one writer per database: writes of different keys also
        # pass one at a time, so they never meet SQLite's own write lock.
        self._gate = TurnLock() if self._dialect.single_writer else None
        self._counters = Counters()
        self._live: set[WriteHandle[Any]] = set()
        # Batch runs and closes of discarded spares: close() waits for them.
        self._background: set[asyncio.Task[None]] = set()
        # Connections parked between writes, newest last, with when they were parked.
        self._spares: list[tuple[AsyncConnection, float]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._state: Literal["new", "started", "closing", "closed"] = "new"
        self._closed = asyncio.Event()

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
        busy = _check_seconds("sqlite_busy_timeout", sqlite_busy_timeout, allow_zero=True)
        parsed, engine_options = urls.engine_options(parsed, engine_options)
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
        if self._state == "started":
            return
        if self._state != "new":
            raise SerializerClosed(
                "this WriteSerializer is closed; create a new one instead of restarting it"
            )
        try:
            async with self._engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                if self._journal:
                    await journal.check_table(conn)
                await conn.rollback()
        except JournalMissing:
            raise
        except Exception as exc:
            url = self._engine.url
            hint = (
                "check that the file's directory exists and is writable, and that the file, "
                "if it exists, is a SQLite database"
                if self._gate is not None
                else "check that the server runs and the URL is right"
            )
            raise DatabaseUnreachable(
                f"cannot reach {redact(url)}: {describe_error(exc, url)}; {hint}"
            ) from None
        self._state = "started"

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting writes, settle the ones in flight, and dispose an owned engine.

        ``drain=True`` lets queued writes run (for at most ``timeout`` seconds,
        if given, after which the rest are stopped as with ``drain=False``);
        ``drain=False`` withdraws queued writes and rolls back running ones,
        which then raise :class:`SerializerClosed`. Idempotent: a second call
        waits for the first.
        """
        if timeout is not None:
            timeout = _check_seconds("timeout", timeout, allow_zero=True)
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        self._state = "closing"
        try:
            if not drain:
                self._stop_all()
            elif timeout is not None:
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout)
                except TimeoutError:
                    self._stop_all()
            await self._idle.wait()
            # A batch settles its writes before it hands its connection back,
            # and a discarded spare closes in a task of its own: both must end
            # before the engine is disposed, or their connections stay open.
            while self._background:
                await asyncio.wait(set(self._background))
        finally:
            await self._close_spares()
            if self._owns_engine:
                await self._engine.dispose()
            self._state = "closed"
            self._closed.set()

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

    def _take_spare(self) -> AsyncConnection | None:
        """A connection parked by an earlier write, if one is fresh enough to trust."""
        now = time.monotonic()
        while self._spares:
            conn, parked = self._spares.pop()
            if now - parked <= _SPARE_MAX_IDLE and not conn.invalidated and not conn.closed:
                return conn
            self._discard_spare(conn)
        return None

    def _park(self, conn: AsyncConnection) -> bool:
        """Keep ``conn`` for the next write instead of returning it to the pool."""
        if (
            self._state != "started"
            or len(self._spares) >= _SPARES
            or conn.invalidated
            or conn.closed
            or conn.in_transaction()
        ):
            return False
        self._spares.append((conn, time.monotonic()))
        return True

    def _drop_spares(self) -> None:
        """Another connection died: the parked ones may have died with it (a restart)."""
        spares, self._spares = self._spares, []
        for conn, _ in spares:
            self._discard_spare(conn)

    def _discard_spare(self, conn: AsyncConnection) -> None:
        task = asyncio.ensure_future(conn.close())
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    async def _close_spares(self) -> None:
        spares, self._spares = self._spares, []
        for conn, _ in spares:
            try:
                await conn.close()
            except Exception as exc:
                log.debug("writeturn: closing a spare connection failed: %r", exc)

    def _stop_all(self) -> None:
        for h in list(self._live):
            h._interrupt(Reason.CLOSE)

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
        h: WriteHandle[None] = self._new_handle(None, (), None, key, writer, timeout, None)
        return TransactionContext(self, h)

    def submit(
        self,
        fn: Callable[..., Awaitable[T]],
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
        ``writer`` (None: its own writer). ``timeout`` bounds the whole write,
        waiting included. With an ``idempotency_key`` the write is journaled:
        if a write with the same key already committed (in any process),
        ``fn`` does not run and the handle completes COMMITTED with
        ``handle.duplicate`` True, so retrying after a timeout, a crash or an
        UNKNOWN outcome applies the write exactly once. ``retries`` (default:
        the serializer's) runs ``fn`` again, in the same turn, after a
        transient failure: a serialization failure or deadlock, a connection
        lost with the outcome known to be ROLLED_BACK, SQLite busy from
        another process; an UNKNOWN outcome only with an idempotency key.
        Awaiting the handle returns ``fn``'s result once the
        transaction committed.
        """
        if not callable(fn):
            raise ConfigurationError(
                f"submit() needs an async function taking the session first, got {fn!r}"
            )
        h: WriteHandle[T] = self._new_handle(
            fn, args, kwargs or None, key, writer, timeout, idempotency_key
        )
        h._retries = self._retries if retries is None else _check_retries(retries)
        h._context = contextvars.copy_context()
        self._enter(h)
        if self._turns.enqueue(h.key, h):
            h.on_grant()
        return h

    async def run(
        self,
        fn: Callable[..., Awaitable[T]],
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
        ik = _check_idempotency_key(idempotency_key)
        async with self._engine.connect() as conn:
            seq = await journal.lookup(conn, self._namespace, ik)
            await conn.rollback()
        return None if seq is None else Outcome.COMMITTED

    # -- introspection -------------------------------------------------------------

    def stats(self) -> SerializerStats:
        """A snapshot of the counters (see :class:`SerializerStats`)."""
        queued = self._turns.statistics().waiting
        return self._counters.snapshot(queued=queued, running=len(self._live) - queued)

    def key_statistics(self, key: str | None = None) -> KeyStatistics:
        """Who holds ``key``'s turn and which writers wait, in turn order."""
        return self._turns.key_statistics(_check_key(key))

    @property
    def engine(self) -> AsyncEngine:
        """The engine writes go through (readers may use it directly)."""
        return self._engine

    @property
    def coordination(self) -> Coordination:
        return self._coordination

    @property
    def namespace(self) -> str:
        return self._namespace

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<WriteSerializer {redact(self._engine.url)} coordination={self._coordination} "
            f"{self._state} queued={s.queued} running={s.running}>"
        )

    # -- internals shared with handles and transactions ------------------------------

    def _new_handle(
        self,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        key: str | None,
        writer: str | None,
        timeout: float | None,
        idempotency_key: str | None,
    ) -> WriteHandle[Any]:
        if self._state != "started":
            if self._state == "new":
                raise SerializerNotStarted()
            raise SerializerClosed(
                f"this WriteSerializer is {self._state}; it accepts no new writes"
            )
        k = _check_key(key)
        if writer is not None and not isinstance(writer, str):
            raise ConfigurationError(
                f"writer must be a string naming who writes (e.g. writer='billing') or None, "
                f"got {writer!r}"
            )
        if timeout is not None:
            timeout = _check_seconds("timeout", timeout, allow_zero=False)
        if idempotency_key is not None:
            idempotency_key = _check_idempotency_key(idempotency_key)
        self._check_reentrant(k)
        if self._max_queue is not None and self._turns.waiting(k) >= self._max_queue:
            raise QueueFull(
                f"{self._max_queue} writes already wait for key {k!r} (max_queue="
                f"{self._max_queue}); nothing was queued. Slow down and retry later, or raise "
                "max_queue; a database that is down makes writes fail fast, so a full queue "
                "usually means writes arrive faster than the database commits them"
            )
        journaled = self._journal or idempotency_key is not None
        return WriteHandle(self, k, writer, fn, args, kwargs, timeout, idempotency_key, journaled)

    def _check_reentrant(self, key: str) -> None:
        task = asyncio.current_task()
        for ser, held, owner in _HELD.get():
            if ser is self and owner is task and (held == key or self._gate is not None):
                where = (
                    "SQLite has a single writer, so any write"
                    if self._gate is not None and held != key
                    else f"a write on key {key!r}"
                )
                raise ReentrantWriteError(
                    f"{where} started inside this task's turn on key {held!r} would wait for "
                    "that turn forever; do the work in the same transaction (use the session "
                    "you already have), or start the write after the turn ends"
                )

    def _enter(self, h: WriteHandle[Any]) -> None:
        """Count ``h`` as live and arm its timeout; it is about to be queued."""
        self._live.add(h)
        self._idle.clear()
        if h._timeout is not None:
            h._timer = asyncio.get_running_loop().call_later(h._timeout, h._expire)

    def _forget(self, h: WriteHandle[Any]) -> None:
        self._live.discard(h)
        if not self._live:
            self._idle.set()

    def _start_worker(self, h: WriteHandle[Any]) -> None:
        loop = asyncio.get_running_loop()
        if self._batch_max > 1:
            # A batch sets each write's task only while its own function runs;
            # the loop keeps only weak references to tasks, so keep this one.
            batch = loop.create_task(self._work_batch(h), context=h._context)
            self._background.add(batch)
            batch.add_done_callback(self._background.discard)
            return
        task = loop.create_task(self._work(h), context=h._context)
        h._task = task
        task.add_done_callback(lambda t: self._worker_done(h))

    async def _work_batch(self, leader: WriteHandle[Any]) -> None:
        task = asyncio.current_task()
        assert task is not None
        _HELD.set((*_HELD.get(), (self, leader.key, task)))
        batch = [leader, *self._claim(leader.key, self._batch_max - 1)]
        # Wait for more only where others are already in line (like Postgres's
        # commit_siblings): a lone writer would pay the window on every write.
        if 1 < len(batch) < self._batch_max and self._batch_window > 0:
            await asyncio.sleep(self._batch_window)  # let more writes of the key arrive
            batch += self._claim(leader.key, self._batch_max - len(batch))
        await BatchRun(self, batch).run()

    def _claim(self, key: str, limit: int) -> list[WriteHandle[Any]]:
        """The next writes in line for ``key`` that a batch may serve (submitted ones only)."""
        claimed = self._turns.claim(
            key, limit, accept=lambda w: isinstance(w, WriteHandle) and w._grant is None
        )
        handles: list[WriteHandle[Any]] = []
        for w in claimed:
            assert isinstance(w, WriteHandle)
            w._granted()
            handles.append(w)
        return handles

    async def _work(self, h: WriteHandle[Any]) -> None:
        task = asyncio.current_task()
        assert task is not None
        _HELD.set((*_HELD.get(), (self, h.key, task)))
        gate_held = False
        while True:
            try:
                result = await self._attempt(h, gate_held)
            except RetryWrite as retry:
                gate_held = self._gate is not None
                try:
                    await asyncio.sleep(retry.delay)  # keeps the turn: the write keeps its place
                except asyncio.CancelledError:
                    self._give_up_retry(h, gate_held, retry.cause)
                    return
                continue
            except (Exception, asyncio.CancelledError) as exc:
                h._finish(exception=exc)
            else:
                h._finish(result=result)
            return

    async def _attempt(self, h: WriteHandle[Any], gate_held: bool) -> Any:
        """Run ``h``'s function in one transaction; raise RetryWrite if it will run again."""
        async with Transaction(self, h, 0, gate_held=gate_held, owns_task=True) as session:
            if h.duplicate:  # a duplicate was applied once already: not again
                return None
            return await h.start_function(session)

    def _give_up_retry(self, h: WriteHandle[Any], gate_held: bool, cause: BaseException) -> None:
        """The write was cancelled while waiting to retry: it ends ROLLED_BACK."""
        if gate_held:
            assert self._gate is not None
            self._gate.release(GATE_KEY)
        self._turns.release(h.key)
        h._set_outcome(Outcome.ROLLED_BACK)
        exc = h._reason_exception()
        if not isinstance(exc, asyncio.CancelledError):
            exc.__cause__ = cause
        h._finish(exception=exc)

    def _worker_done(self, h: WriteHandle[Any]) -> None:
        if h._state is State.DONE:
            return
        # Cancelled before its first step, the task ran no code: the turn it
        # was granted is still held. Pass it on; the write never began.
        log.debug("writeturn: write on key %r stopped before it began", h.key)
        self._turns.release(h.key)
        h._set_outcome(Outcome.WITHDRAWN)
        h._finish(exception=h._reason_exception())


class TransactionContext:
    """``async with ser.transaction(...) as session``: waits for the turn, then one transaction."""

    __slots__ = ("_ser", "handle", "_txn", "_token")

    def __init__(self, ser: WriteSerializer, handle: WriteHandle[None]) -> None:
        self._ser = ser
        self.handle = handle
        self._txn: Transaction | None = None
        self._token: contextvars.Token[Any] | None = None

    async def __aenter__(self) -> AsyncSession:
        ser, h = self._ser, self.handle
        if self._txn is not None or h._state is not State.QUEUED:
            raise ConfigurationError(
                "this transaction() context was already entered; call ser.transaction() again "
                "for another write"
            )
        task = asyncio.current_task()
        assert task is not None
        entry_cancelling = task.cancelling()
        h._task = task
        ser._enter(h)
        if not ser._turns.enqueue(h.key, h):
            h._grant = asyncio.get_running_loop().create_future()
            try:
                await h._grant
            except BaseException as exc:
                if not h.done():
                    if not ser._turns.withdraw(h.key, h):
                        ser._turns.release(h.key)  # granted as we were cancelled: pass it on
                    h._set_outcome(Outcome.WITHDRAWN)
                    final = h._cancellation(exc, task, entry_cancelling)
                    h._finish(exception=final)
                    if final is not exc:
                        raise final from None
                raise
        self._token = _HELD.set((*_HELD.get(), (ser, h.key, task)))
        self._txn = Transaction(ser, h, entry_cancelling)
        try:
            return await self._txn.__aenter__()
        except BaseException as exc:
            self._reset()
            h._finish(exception=exc)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._txn is not None
        try:
            suppress = await self._txn.__aexit__(exc_type, exc, tb)
        except BaseException as final:
            self.handle._finish(exception=final)
            raise
        finally:
            self._reset()
        self.handle._finish(exception=exc)
        return suppress

    def _reset(self) -> None:
        if self._token is not None:
            _HELD.reset(self._token)
            self._token = None


def _check_key(key: object) -> str:
    if key is None:
        return DEFAULT_KEY
    if not isinstance(key, str) or not key:
        raise ConfigurationError(
            f"key must be a non-empty string or None, got {key!r}; name what the write "
            "protects, e.g. key=f'account:{account_id}'"
        )
    return key


def _check_idempotency_key(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 500:
        raise ConfigurationError(
            f"idempotency_key must be a non-empty string of at most 500 characters, got "
            f"{value!r}; use a request id, e.g. idempotency_key=f'payment:{{request_id}}'"
        )
    return value


def _check_retries(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigurationError(
            f"retries={value!r} must be a whole number, 0 or more (e.g. retries=3)"
        )
    return value


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
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
