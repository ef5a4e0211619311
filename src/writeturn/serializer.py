"""The serializer: fair, ordered, cancellation-safe writes through one AsyncEngine."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar, TypeVarTuple, Unpack, overload

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import journal
from ._batch import BatchRun
from ._engines import SqlitePragmas, create_engine
from ._lifecycle import Phase
from ._options import (
    Coordination,
    Options,
    check_busy_timeout,
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
from .dialects import PoolerMisconfigured
from .errors import (
    ConfigurationError,
    DatabaseUnreachable,
    JournalMissing,
    QueueFull,
    ReentrantWriteError,
    SerializerClosed,
    shown,
)
from .handle import WriteHandle
from .outcome import Outcome
from .stats import SerializerStats
from .turnlock import KeyStatistics
from .urls import backend_of, describe_error, normalize_url, redact

__all__ = ["WriteSerializer", "TransactionContext"]

log = logging.getLogger("writeturn")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class WriteSerializer:
    """Per key, one write at a time, in fair turns; a cancelled write always rolls back cleanly.

    Guarantees (each one tested against the real database):

    1. Mutual exclusion: per key, one write runs at a time (its function
       starts after the previous write's transaction ended): among this
       process's tasks (``coordination="turn"``), or among all processes
       sharing the database (``"advisory"``).
    2. Order: per (key, writer), writes start in submission order.
    3. Alternation: per key, turns rotate round-robin among writers with
       pending writes; ``writer=None`` makes each write its own writer.
    4. Clean hand-over: a turn passes on only after COMMIT or ROLLBACK was
       acknowledged (or the connection was discarded); in advisory mode on
       Postgres, a write that will not run again passes it on as its COMMIT
       goes out, and the key's lock holds the next write until that ended.
    5. Cancellation: queued, the write is WITHDRAWN and never runs; running,
       it is rolled back to completion, then the turn passes (ROLLED_BACK);
       committing, the commit finishes and the outcome says what happened;
       then the cancellation propagates. ``asyncio.timeout`` around any call
       still raises ``TimeoutError``.
    6. Outcome truth: ``outcome == COMMITTED`` iff the effects are in the database.
    7. Re-entrancy: a write on a key whose turn this task holds, or was
       started inside while that turn's holder runs, raises
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
        pgbouncer: bool = False,
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
                pgbouncer=bool(pgbouncer),
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
        pgbouncer: bool = False,
        **engine_options: Any,
    ) -> WriteSerializer:
        """Create a serializer with an engine of its own, disposed by :meth:`close`.

        Accepts ``sqlite+aiosqlite://`` and ``postgresql+asyncpg://`` URLs (plain
        ``sqlite://`` and ``postgresql://`` are mapped to those drivers). SQLite
        files get WAL, foreign keys, a busy timeout of ``sqlite_busy_timeout``
        seconds and ``synchronous=sqlite_synchronous`` (NORMAL by default;
        FULL makes every COMMIT durable against power loss, at the cost of a
        flush each). ``pgbouncer=True`` is for a URL that goes through a pooler in
        transaction mode (PgBouncer): it turns off asyncpg's and SQLAlchemy's
        prepared-statement caches and gives each prepared statement a unique
        name, so that no statement lands on another client's server connection.
        ``engine_options`` go to ``create_async_engine``.
        """
        parsed = normalize_url(url)
        backend = backend_of(parsed)
        if backend != "sqlite" and sqlite_synchronous is not None:
            raise ConfigurationError(
                f"sqlite_synchronous={shown(sqlite_synchronous)} applies to SQLite only, and "
                f"{redact(parsed)} is {backend}; drop the option"
            )
        busy = check_busy_timeout(sqlite_busy_timeout)
        pragmas = SqlitePragmas(sqlite_synchronous or "NORMAL", busy)
        engine = create_engine(
            parsed,
            engine_options,
            pgbouncer=pgbouncer,
            sqlite_pragmas=pragmas if backend == "sqlite" else None,
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
                pgbouncer=pgbouncer,
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
        life = rt.lifecycle
        if life.phase is Phase.STARTED:
            return
        if life.phase is not Phase.NEW:
            raise SerializerClosed(
                "this WriteSerializer is closed; create a new one instead of restarting it"
            )
        # A task that close() waits for, as for a batch: a close() called meanwhile must
        # not dispose the engine before this check hands its connection back.
        check = asyncio.get_running_loop().create_task(self._check_database())
        rt.keep(check)
        await check
        if life.accepts_writes:  # another start() connected first: started
            return
        if life.phase is not Phase.NEW:  # close() was called while start() connected
            raise SerializerClosed("this WriteSerializer was closed while it started")
        life.move(Phase.STARTED)

    async def _check_database(self) -> None:
        """start()'s check: the database answers, as the options expect."""
        rt = self._rt
        try:
            async with rt.engine.connect() as conn:
                pooled = await rt.dialect.behind_pooler(conn)
                level = await rt.dialect.isolation(conn)
                if rt.options.journal:
                    await journal.check_table(conn)
                await conn.rollback()
        except JournalMissing:
            raise
        except PoolerMisconfigured as exc:
            raise ConfigurationError(_pooler_hint(rt.engine.url, str(exc))) from None
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
        if pooled and not rt.options.pgbouncer:
            raise ConfigurationError(_pooler_hint(rt.engine.url, "its session ids differ"))
        _check_isolation(rt, level)

    def close(self, drain: bool = True, timeout: float | None = None) -> Coroutine[Any, Any, None]:
        """Stop accepting writes, settle the ones in flight, and dispose an owned engine.

        No write is accepted from the moment ``close()`` is called, before its
        coroutine is awaited or its task runs (``submit()`` then raises
        :class:`SerializerClosed`). ``drain=True`` lets queued writes run (for at
        most ``timeout`` seconds, if given, after which the rest are stopped as
        with ``drain=False``). ``drain=False`` withdraws queued writes (WITHDRAWN)
        and rolls back running ones (ROLLED_BACK); both then raise
        :class:`SerializerClosed`. A write whose COMMIT is already in flight is
        not cut off: it ends as the database decides (guarantee 5). Idempotent,
        and safe to cancel: the close goes on, and every later call waits for it
        to finish. Refused (:class:`ReentrantWriteError`) inside a write of this
        serializer, which it would wait for forever.
        """
        # A plain method returning the coroutine: what is decided here happens at the
        # call, so a write submitted between the call and its first await is refused.
        if timeout is not None:
            timeout = check_seconds("timeout", timeout, allow_zero=True)
        held = holds_turn(self._rt, inside=True) if _in_event_loop() else None
        if held is not None:
            raise ReentrantWriteError(
                f"close() called inside a write on key {shown(held)} of this serializer would wait "
                "for that write forever; close the serializer after the write, from outside it"
            )
        life = self._rt.lifecycle
        if life.phase in (Phase.NEW, Phase.STARTED):
            life.move(Phase.CLOSING)  # _new_record() refuses from now on
        return self._finish_close(drain, timeout)

    async def _finish_close(self, drain: bool, timeout: float | None) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(drain, timeout))
        elif not drain:
            self._stop_all()
        # Shielded: a cancelled close() leaves the close running, and the next
        # close() waits for the same one.
        await asyncio.shield(self._closing)

    async def _close(self, drain: bool, timeout: float | None) -> None:
        rt = self._rt  # CLOSING since the close() call that made this task
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
            rt.lifecycle.move(Phase.CLOSED)

    def _stop_all(self) -> None:
        for record in self._rt.unsettled():
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

    @overload
    def submit(
        self,
        fn: Callable[[WriteSession, Unpack[Ts]], Awaitable[T]],
        /,
        *args: *Ts,
        key: str | None = None,
        writer: str | None = None,
        timeout: float | None = None,
        idempotency_key: None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> WriteHandle[T]: ...

    @overload
    def submit(
        self,
        fn: Callable[[WriteSession, Unpack[Ts]], Awaitable[T]],
        /,
        *args: *Ts,
        key: str | None = None,
        writer: str | None = None,
        timeout: float | None = None,
        idempotency_key: str,
        retries: int | None = None,
        **kwargs: Any,
    ) -> WriteHandle[T | None]: ...

    def submit(  # type: ignore[misc]  # mypy cannot match Unpack[Ts] against *args: Any
        self,
        fn: Callable[..., Awaitable[Any]],
        /,
        *args: Any,
        key: str | None = None,
        writer: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> WriteHandle[Any]:
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
        committed, or None for a duplicate, whose ``fn`` did not run (so with
        an ``idempotency_key`` the handle is typed ``WriteHandle[T | None]``).
        An idempotency key already used on another key raises
        :class:`IdempotencyKeyReused` (ROLLED_BACK; ``fn`` does not run).
        ``fn`` must be an ``async def``: a plain function is refused here.

        Typing: ``fn``'s first parameter must accept a :class:`WriteSession`
        and ``args`` are checked against its other positional parameters;
        keyword arguments for ``fn`` pass through unchecked (a keyword-only
        parameter without a default makes the call a type error: give it a
        default, or bind it with ``functools.partial``).
        """
        _check_write_function(fn)
        record = self._new_record(
            fn,
            args,
            kwargs or None,
            key,
            writer,
            timeout,
            idempotency_key,
            self._rt.options.retries if retries is None else check_retries(retries),
            contextvars.copy_context(),
        )
        self._rt.enter(record)
        record.arm(on_grant=self._on_grant)
        if self._rt.turns.enqueue(record.key, record):
            record.on_grant()
        return WriteHandle(record)

    @overload
    async def run(
        self,
        fn: Callable[[WriteSession, Unpack[Ts]], Awaitable[T]],
        /,
        *args: *Ts,
        key: str | None = None,
        writer: str | None = None,
        timeout: float | None = None,
        idempotency_key: None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> T: ...

    @overload
    async def run(
        self,
        fn: Callable[[WriteSession, Unpack[Ts]], Awaitable[T]],
        /,
        *args: *Ts,
        key: str | None = None,
        writer: str | None = None,
        timeout: float | None = None,
        idempotency_key: str,
        retries: int | None = None,
        **kwargs: Any,
    ) -> T | None: ...

    async def run(  # type: ignore[misc]  # as submit()
        self,
        fn: Callable[..., Awaitable[Any]],
        /,
        *args: Any,
        key: str | None = None,
        writer: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> Any:
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
        return rt.counters.snapshot(queued=queued, running=len(rt.out_of_line))

    def observe(self, observer: Callable[[str, float], None]) -> Callable[[], None]:
        """Call ``observer(kind, seconds)`` for every wait (``"wait"``: submission to
        turn) and hold (``"hold"``: turn to settle) the serializer records, in the
        event loop, synchronously; return a function that stops it. What an observer
        raises (``CancelledError`` included; only ``KeyboardInterrupt`` and
        ``SystemExit`` pass) is logged and never affects a write; an observer that
        stops itself or another while called costs no other observer that sample.
        (:mod:`writeturn.metrics` uses this.)
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
            f"{rt.lifecycle.phase.value} queued={s.queued} running={s.running}>"
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
        retries: int = 0,
        context: contextvars.Context | None = None,
    ) -> WriteRecord:
        rt = self._rt
        life = rt.lifecycle
        if not life.accepts_writes:
            raise life.refusal()
        k = check_key(key)
        w = check_writer(writer)
        seconds = None if timeout is None else check_seconds("timeout", timeout, allow_zero=False)
        ik = None if idempotency_key is None else check_idempotency_key(idempotency_key)
        self._check_reentrant(k)
        max_queue = rt.options.max_queue
        if max_queue is not None and rt.turns.waiting(k) >= max_queue:
            raise QueueFull(
                f"{max_queue} writes already wait for key {shown(k)} (max_queue={max_queue}); "
                "nothing was queued. Slow down and retry later, or raise max_queue; a database "
                "that is down makes writes fail fast, so a full queue usually means writes "
                "arrive faster than the database commits them"
            )
        return WriteRecord(
            rt,
            k,
            w,
            fn,
            args,
            kwargs,
            timeout=seconds,
            idempotency_key=ik,
            retries=retries,
            context=context,
        )

    def _check_reentrant(self, key: str) -> None:
        """Refuse a write that its own caller's turn would make wait forever.

        Counted: a turn the current task holds, and a turn the current task
        was started inside (``gather``, ``create_task``, ``wait_for`` from a
        write copy its context) while that turn's holder still runs. The
        second is a deadlock when the holder awaits the new write, and is
        refused even when it would not: a task cannot tell the two apart.
        """
        rt = self._rt
        held = holds_turn(rt, key)
        spawned = held is None
        if spawned:
            held = holds_turn(rt, key, inside=True)
        if held is None:
            return
        where = (
            "SQLite has a single writer, so any write"
            if rt.gate is not None and held != key
            else f"a write on key {shown(key)}"
        )
        if spawned:
            raise ReentrantWriteError(
                f"{where} started from a task spawned inside the turn on key {shown(held)}, "
                "while that turn still runs, is refused: if the turn awaits it, it waits "
                "forever. Do the work in the same transaction (use the session you already "
                "have), or start the write after the turn ends"
            )
        raise ReentrantWriteError(
            f"{where} started inside this task's turn on key {shown(held)} would wait for "
            "that turn forever; do the work in the same transaction (use the session "
            "you already have), or start the write after the turn ends"
        )

    def _start(self, record: WriteRecord) -> None:
        """The write's turn came: run it, alone or with the writes queued behind it."""
        if self._rt.options.batch_max > 1:
            BatchRun(self._rt, record)
        else:
            SingleRun(self._rt, record)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # e.g. asyncio.run(ser.close()): called before the loop runs
        return False
    return True


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_isolation(rt: Runtime, level: str) -> None:
    """Refuse the one combination whose writes could see a stale snapshot.

    At REPEATABLE READ and SERIALIZABLE a transaction's snapshot is fixed by its
    first statement. In advisory mode the key's lock is therefore taken before
    the transaction begins, as a session lock, which a transaction pooler cannot
    keep: it hands the server connection to another client after each transaction.
    """
    if rt.dialect.name != "postgresql":
        return  # SQLite: BEGIN IMMEDIATE takes the lock before the first statement
    snapshot = level.lower() in ("repeatable read", "serializable")
    if snapshot and rt.options.coordination == "advisory" and rt.options.pgbouncer:
        shown_level = level.upper()
        raise ConfigurationError(
            f"writes on {redact(rt.engine.url)} run at {shown_level}, and advisory mode "
            "behind a transaction pooler (pgbouncer=True) cannot give them a fresh "
            f"snapshot: at {shown_level} Postgres fixes a transaction's snapshot with its "
            "first statement, before that statement waits for the key's lock, and behind "
            "the pooler the lock can live only inside that transaction, so a write would "
            "not see the write that committed just before its turn. Use READ COMMITTED "
            "(isolation_level='READ COMMITTED', the default), or coordination='turn' "
            "(writes of one process), or connect to Postgres directly for advisory writes "
            f"at {shown_level}"
        )


def _pooler_hint(url: URL, why: str) -> str:
    return (
        f"{redact(url)} answers through a connection pooler ({why}), and this serializer "
        "was not told: behind PgBouncer in transaction mode, prepared statements of one "
        "client land on another's server connection. Use WriteSerializer.from_url(url, "
        "pgbouncer=True); for an engine of your own, create it with "
        "connect_args={'statement_cache_size': 0, 'prepared_statement_name_func': ...} and "
        "?prepared_statement_cache_size=0 in its URL, then pass WriteSerializer(engine, "
        "pgbouncer=True)"
    )


def _check_write_function(fn: object) -> None:
    """Refuse, before it runs, a write function that is not an ``async def``.

    A plain function, a method, a ``functools.partial`` of either, or an
    object whose ``__call__`` is one, is refused here. What cannot be told
    without calling it (a class, a builtin, a C-level callable) runs, and a
    result that is not awaitable is refused then (the write rolls back).
    """
    if not callable(fn):
        raise ConfigurationError(
            f"submit() needs an async function taking the session first, got {shown(fn)}"
        )
    target: object = fn
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target):
        return
    if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isclass(target)):
        target = type(target).__call__  # a callable object: what calling it runs
    if inspect.ismethod(target):
        target = target.__func__
    if not inspect.isfunction(target) or inspect.iscoroutinefunction(target):
        return
    # A decorator that kept the async function's identity (functools.wraps)
    # returns that function's coroutine: let it run (checked then).
    if inspect.iscoroutinefunction(inspect.unwrap(target)):
        return
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    what = "an async generator" if inspect.isasyncgenfunction(target) else "a plain function"
    raise ConfigurationError(
        f"the write function {shown(name)} is {what}, not an `async def`; nothing was "
        "queued. Define it as `async def fn(session, ...)` and await the session's calls in it"
    )
