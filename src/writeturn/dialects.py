"""What differs between SQLite and Postgres: every statement writeturn itself sends.

A :class:`Dialect` begins a write transaction (taking the database lock in
advisory mode), asks the driver to stop a running statement, and, on
Postgres, learns the fate of a transaction whose COMMIT was cut off. What
an error they raise means is decided in :mod:`writeturn._error_kinds`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import logging
import sqlite3
import uuid
from typing import Any, ClassVar, NamedTuple

from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._connections import retire_generation
from ._error_kinds import ErrorKind, classify
from ._options import Coordination, check_busy_timeout
from ._sqlite_queue import TicketQueue, wait_turn
from .errors import ConfigurationError, UnsupportedDatabase, shown
from .outcome import Outcome

__all__ = [
    "Dialect",
    "TransactionId",
    "SQLiteDialect",
    "PostgresDialect",
    "dialect_for",
    "lock_id",
    "migration_lock_id",
    "reached_through_pooler",
    "SQLITE_SYNCHRONOUS",
    "PoolerMisconfigured",
    "for_transaction_pooler",
]

log = logging.getLogger("writeturn")

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

#: A Postgres server as a transaction id knows it: its system identifier and
#: the timeline it writes on.
ServerId = tuple[int, int]


#: The server's system identifier and current WAL file (its first eight hex digits
#: are the timeline), selected after other columns: see _server_id. The WAL position
#: function fails on a standby ("recovery is in progress"), which takes no writes.
_SERVER_COLUMNS = (
    "system_identifier, pg_walfile_name(pg_current_wal_lsn()) FROM pg_control_system()"
)


class TransactionId(NamedTuple):
    """A transaction's id and the server that gave it.

    An id means something only on the server (and timeline) that gave it. A
    standby promoted after a failover goes on from the last id it replayed,
    so an id the old primary gave to a transaction that never reached the
    standby is given again, on the new timeline, to another transaction: asked
    about it there, ``txid_status`` answers about that other one.
    """

    number: int
    #: (system identifier, timeline) of the server that gave ``number``.
    server: ServerId


def lock_id(namespace: str, key: str) -> int:
    """The signed 64-bit advisory lock key for writes on (namespace, key).

    A stable hash (BLAKE2b), identical in every process and on every machine;
    Python's ``hash()`` is salted per process and would not be. Personalised
    for writes, so no write key can share a lock with the migration lock.

    The derivation is part of the compatibility contract: every release must
    compute the same id for the same (namespace, key). During a rolling
    deploy, old and new processes write side by side, and a different
    derivation would let them take different locks for one key: both would
    write at once. (``tests/unit/test_lock_ids.py`` pins known ids.) The
    input joins namespace and key with a NUL, so neither may contain one,
    or ``('a', 'b\\x00c')`` and ``('a\\x00b', 'c')`` would share a lock:
    the serializer refuses such names before any write.
    """
    digest = hashlib.blake2b(
        f"{namespace}\x00{key}".encode(), digest_size=8, person=b"writeturn.write"
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def migration_lock_id(namespace: str, name: str) -> int:
    """The signed 64-bit advisory lock key of the migration lock on (namespace, name).

    The same stable hash as :func:`lock_id`, not personalised (as released),
    so it never equals a write's id; equally part of the compatibility
    contract: migrators of two releases must wait for each other.
    """
    digest = hashlib.blake2b(f"{namespace}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def reached_through_pooler(driver: Any, backend_pid: object) -> bool:
    """Whether asyncpg's ``driver`` talks to the backend ``backend_pid`` (from
    ``SELECT pg_backend_pid()``) through a connection pooler (PgBouncer).

    The pid the server gave the client at startup is, through a pooler, the
    pooler's own cancel key, not the backend's pid.
    """
    return driver is not None and backend_pid is not None and driver.get_server_pid() != backend_pid


#: ``lock_id`` for the keys in use: a write's BEGIN would otherwise hash its key each time.
_lock_id = functools.lru_cache(maxsize=4096)(lock_id)

# asyncpg's states of a Transaction object; see _OneMessageBegin
_TransactionState: Any = None
try:
    from asyncpg import transaction as _asyncpg_transaction  # type: ignore[import-untyped]

    _TransactionState = _asyncpg_transaction.TransactionState
except (ImportError, AttributeError):  # pragma: no cover - BEGIN then goes the adapter's way
    pass


class Dialect:
    """The database-specific steps of a write; one instance per serializer."""

    name: str = "?"
    #: True when the database admits one writer at a time whatever the key
    #: (SQLite): the serializer then also serializes writes across keys.
    single_writer: bool = False
    #: True when a failed statement aborts the whole transaction (Postgres): a
    #: function that caught the error must not be reported as committed.
    aborts_on_error: bool = False
    #: The isolation level a journal probe runs at (None: the engine's).
    probe_isolation: str | None = None

    @property
    def lock_orders_next(self) -> bool:
        """True when the database itself holds the key's next write until this one's
        transaction has ended (Postgres in advisory mode: the next BEGIN waits for
        the key's lock, which COMMIT releases). The turn may then pass on as the
        COMMIT goes out, so the next write's BEGIN travels while it is under way."""
        return False

    def __init__(self, coordination: Coordination, namespace: str) -> None:
        self.coordination = coordination
        self.namespace = namespace

    async def begin(
        self, conn: AsyncConnection, key: str, deadline: float | None = None
    ) -> TransactionId | None:
        """Start the write transaction on ``conn``; return its id if one is known.

        ``deadline`` (event-loop time) is when the write's timeout expires.
        """
        raise NotImplementedError

    def driver_in_transaction(self, conn: AsyncConnection) -> bool:
        """Whether the driver's connection is inside a transaction, whatever SQLAlchemy thinks."""
        return False

    async def isolation(self, conn: AsyncConnection) -> str:
        """The isolation level writes run at, as the database names it."""
        return "serializable"

    def holds_lock(self, conn: AsyncConnection) -> bool:
        """Whether ``conn`` holds a key's lock beyond its transaction (see :meth:`release`)."""
        return False

    async def release(self, conn: AsyncConnection) -> None:
        """Release a key's lock that outlives the transaction that took it, if ``conn``
        holds one; called when the transaction has ended, before ``conn`` is reused."""
        return None

    def alive(self, conn: AsyncConnection) -> bool:
        """False if the driver already knows ``conn`` was closed (no round trip)."""
        return True

    async def behind_pooler(self, conn: AsyncConnection) -> bool:
        """Whether ``conn`` reaches the database through a connection pooler (PgBouncer).

        Checks that the database answers too (one round trip).
        """
        await conn.exec_driver_sql("SELECT 1")
        return False

    def terminate(self, conn: AsyncConnection) -> None:
        """Close ``conn``'s socket at once, so that a call hanging on it fails."""
        return None

    async def interrupt(self, conn: AsyncConnection, engine: AsyncEngine) -> None:
        """Ask the driver to stop the statement running on ``conn`` with an ordinary error."""
        raise NotImplementedError

    async def commit_outcome(self, engine: AsyncEngine, xid: TransactionId | None) -> Outcome:
        """Learn, on a fresh connection, whether transaction ``xid`` committed."""
        return Outcome.UNKNOWN


class SQLiteDialect(Dialect):
    """SQLite: every write begins IMMEDIATE, so it takes the write lock up front
    (waiting up to the busy timeout) instead of failing at its first write
    with "database is locked", which a DEFERRED transaction does whatever
    the busy timeout says.

    In advisory mode a write first lines up for the lock with the other
    processes writing the same file (see :mod:`writeturn._sqlite_queue`), so
    that they take it in turn instead of one draining its backlog while the
    others wait.

    The connection's busy timeout is the one configured on every path: a
    write whose deadline is nearer waits for the lock only until then, and
    writeturn never interrupts into that wait (the interrupt would not stop
    it, and would land on the statement that restores the busy timeout).
    """

    name = "sqlite"
    single_writer = True

    def __init__(self, coordination: Coordination, namespace: str) -> None:
        super().__init__(coordination, namespace)
        # advisory: the line for the write lock, opened at the first write
        # (None: not opened yet, or turned off: a memory database, no file access).
        self._queue: TicketQueue | None = None
        self._queue_tried = coordination != "advisory"
        # id(conn) -> the BEGIN in progress on it, for interrupt().
        self._beginning: dict[int, _Beginning] = {}

    async def begin(
        self, conn: AsyncConnection, key: str, deadline: float | None = None
    ) -> TransactionId | None:
        # SQLAlchemy's own bookkeeping (pysqlite sends nothing for it), then
        # BEGIN IMMEDIATE straight to the driver: one round trip to SQLite's
        # thread, where a statement through SQLAlchemy costs three.
        await conn.begin()
        driver = _driver(conn)
        step = self._beginning[id(conn)] = _Beginning()
        try:
            if _BUSY_SHORTENED in conn.info:
                await self._restore_busy_timeout(conn, driver)
            queue = self._queue if self._queue_tried else await self._open_queue(driver)
            if queue is None or queue.ticket:  # no line, or a nested begin (a journal probe)
                await self._begin_immediate(conn, driver, deadline)
            else:
                try:
                    if not queue.first():  # others are ahead in line: wait for them
                        patience = await self._busy_timeout_ms(conn, driver) / 1000 + _PATIENCE
                        await wait_turn(
                            queue, deadline=deadline, patience=patience, interrupted=step.stopped
                        )
                    await self._begin_immediate(conn, driver, deadline)
                finally:
                    queue.leave()  # with the lock (or an error): the next in line may ask
            if step.interrupted:  # stopped during BEGIN's wait: end now, as an interrupt would
                raise sqlite3.OperationalError("interrupted")
        except sqlite3.Error as exc:
            # Raised by the driver itself: wrap it as SQLAlchemy would have.
            raise DBAPIError.instance("BEGIN IMMEDIATE", (), exc, sqlite3.Error) from exc
        finally:
            del self._beginning[id(conn)]
        return None

    async def _begin_immediate(
        self, conn: AsyncConnection, driver: Any, deadline: float | None
    ) -> None:
        if _begin_at_once(conn, driver):
            return
        if deadline is not None:
            # sqlite3_interrupt does not stop a busy wait, so a write with a
            # timeout waits for another process's lock at most until then
            # (a little past it, so that writeturn's timeout ends the wait).
            configured = await self._busy_timeout_ms(conn, driver)
            cap = int(max(0.0, deadline - asyncio.get_running_loop().time()) * 1000) + 50
            if cap < configured:
                # Noted before it is set: a restore that fails is tried again
                # at the connection's next BEGIN.
                conn.info[_BUSY_SHORTENED] = True
                await driver.execute(f"PRAGMA busy_timeout={cap}")
                try:
                    await driver.execute("BEGIN IMMEDIATE")
                finally:
                    await self._restore_busy_timeout(conn, driver)
                return
        await driver.execute("BEGIN IMMEDIATE")

    async def _restore_busy_timeout(self, conn: AsyncConnection, driver: Any) -> None:
        """Set the connection's own busy timeout again if a capped BEGIN shortened it."""
        if not conn.info.get(_BUSY_SHORTENED):
            return
        configured = await self._busy_timeout_ms(conn, driver)
        for attempt in range(3):
            try:
                await driver.execute(f"PRAGMA busy_timeout={configured}")
            except sqlite3.OperationalError:  # an interrupt from elsewhere: it lands once
                if attempt == 2:
                    raise
                continue
            del conn.info[_BUSY_SHORTENED]
            return

    async def _open_queue(self, driver: Any) -> TicketQueue | None:
        """Open the database file's line for the write lock, once; None where there is none."""
        self._queue_tried = True
        rows = await (await driver.execute("PRAGMA database_list")).fetchall()
        files = [row[2] for row in rows if row[1] == "main" and row[2]]
        if not files:
            return None  # in memory: no other process can write it
        try:
            self._queue = await asyncio.to_thread(TicketQueue, files[0])
        except (OSError, ImportError) as exc:
            log.warning(
                "writeturn: processes writing %s cannot take turns at its write lock (%s); "
                "each write waits for SQLite's lock directly",
                files[0],
                exc,
            )
        return self._queue

    @staticmethod
    async def _busy_timeout_ms(conn: AsyncConnection, driver: Any) -> int:
        """The connection's own busy timeout, read once per connection."""
        busy = conn.info.get(_BUSY_MS)
        if busy is None:
            row = await (await driver.execute("PRAGMA busy_timeout")).fetchone()
            busy = _remember_busy_ms(conn, row)
        return int(busy)

    async def interrupt(self, conn: AsyncConnection, engine: AsyncEngine) -> None:
        step = self._beginning.get(id(conn))
        if step is not None:
            # In line, or in BEGIN's busy wait: begin() ends with "interrupted"
            # once that wait returns (an sqlite3_interrupt would not stop it).
            step.interrupted = True
            return
        driver = _driver(conn)
        if driver is not None:
            await driver.interrupt()

    def driver_in_transaction(self, conn: AsyncConnection) -> bool:
        driver = _driver(conn)
        return bool(driver is not None and driver.in_transaction)


_SESSION_LOCK = "writeturn_session_lock"  # conn.info: a key's session lock taken (or asked for)
_BUSY_MS = "writeturn_busy_ms"  # conn.info: the connection's own busy timeout, in ms
_BUSY_SHORTENED = "writeturn_busy_shortened"  # conn.info: a capped BEGIN changed the timeout
_PATIENCE = 1.0  # seconds beyond the busy timeout before a line that does not move is left


_NO_DIRECT_CALLS = "writeturn_no_direct_calls"  # conn.info: sqlite3 refuses this thread


def _begin_at_once(conn: AsyncConnection, driver: Any) -> bool:
    """BEGIN IMMEDIATE from the event loop's thread, if SQLite's write lock is free now.

    Every statement through aiosqlite is a round trip to the connection's own
    thread, the dearest part of a short write after the COMMIT. With the
    busy timeout at zero for this one statement, BEGIN IMMEDIATE takes the
    lock at once or fails at once ("database is locked"), so it cannot block
    the event loop; only then does the write wait for the lock on the
    connection's thread, with its configured timeout (False). Possible where
    the ``sqlite3`` connection may be used from this thread (SQLAlchemy opens
    a file database with ``check_same_thread=False``) and nothing else runs on
    it: it is the write's own, and no round trip of it is in flight.
    """
    info = conn.info
    if _NO_DIRECT_CALLS in info:
        return False
    raw = getattr(driver, "_connection", None)
    if not isinstance(raw, sqlite3.Connection):
        info[_NO_DIRECT_CALLS] = True
        return False
    try:
        busy = info.get(_BUSY_MS)
        if busy is None:
            busy = _remember_busy_ms(conn, raw.execute("PRAGMA busy_timeout").fetchone())
        raw.execute("PRAGMA busy_timeout=0")
    except sqlite3.ProgrammingError:  # created with check_same_thread (a memory database)
        info[_NO_DIRECT_CALLS] = True
        return False
    try:
        raw.execute("BEGIN IMMEDIATE")
    except sqlite3.Error:
        return False  # busy (or worse): the usual BEGIN waits for it, or says what it is
    finally:
        raw.execute(f"PRAGMA busy_timeout={int(busy)}")
    return True


def _remember_busy_ms(conn: AsyncConnection, row: Any) -> int:
    """Note ``conn``'s own busy timeout (the row of ``PRAGMA busy_timeout``): read once."""
    busy = int(row[0] if row else 0)
    conn.info[_BUSY_MS] = busy
    return busy


class _Beginning:
    """A BEGIN in progress on one connection; interrupt() marks it stopped."""

    __slots__ = ("interrupted",)

    def __init__(self) -> None:
        self.interrupted = False

    def stopped(self) -> bool:
        return self.interrupted


class PostgresDialect(Dialect):
    """Postgres: in advisory mode the write's first statement takes
    ``pg_advisory_xact_lock`` on the key, which Postgres releases at COMMIT,
    ROLLBACK or disconnect (and which works behind PgBouncer in transaction
    mode); it also reads the transaction id, so a COMMIT cut off by a lost
    connection can be resolved afterwards with ``txid_status``."""

    name = "postgresql"
    aborts_on_error = True
    probe_isolation = "READ COMMITTED"

    @property
    def lock_orders_next(self) -> bool:
        return self.coordination == "advisory"

    _LOCK = text("SELECT pg_advisory_xact_lock(:lock_id), txid_current()")
    #: The server a connection reaches (see _SERVER_COLUMNS), where BEGIN cannot ask.
    _SERVER_SQL = f"SELECT {_SERVER_COLUMNS}"
    _STATUS = text(f"SELECT txid_status(:xid), {_SERVER_COLUMNS}")
    _CANCEL = text("SELECT pg_cancel_backend(:pid)")

    #: The lock query as asyncpg takes it: one prepared statement for every key.
    _LOCK_SQL = "SELECT pg_advisory_xact_lock($1), txid_current()"
    #: Where the lock was taken before BEGIN (see begin()).
    _TXID_SQL = "SELECT txid_current()"

    #: Isolation levels whose transaction snapshot is fixed by the first statement.
    _SNAPSHOT_LEVELS = frozenset({"repeatable_read", "serializable"})

    def __init__(self, coordination: Coordination, namespace: str) -> None:
        super().__init__(coordination, namespace)
        #: A BEGIN that names no level runs at REPEATABLE READ or SERIALIZABLE (the
        #: server's, database's or role's default_transaction_isolation); see isolation().
        self.default_snapshot = False

    async def isolation(self, conn: AsyncConnection) -> str:
        """The level writes on ``conn``'s engine run at ("read committed", ...).

        Also learns the server's default, which a BEGIN that names no level gets.
        """
        result = await conn.exec_driver_sql(
            "SELECT current_setting('transaction_isolation'), "
            "current_setting('default_transaction_isolation')"
        )
        level, default = (str(value) for value in result.one())
        self.default_snapshot = default.replace(" ", "_") in self._SNAPSHOT_LEVELS
        return level

    def _snapshot(self, adapter: Any) -> bool:
        level = getattr(adapter, "isolation_level", None)
        return level in self._SNAPSHOT_LEVELS or (level is None and self.default_snapshot)

    async def begin(
        self, conn: AsyncConnection, key: str, deadline: float | None = None
    ) -> TransactionId | None:
        """BEGIN with the key's lock, and the transaction id, in as few messages as can be.

        At READ COMMITTED the lock (``pg_advisory_xact_lock``) travels in BEGIN's
        own message. At REPEATABLE READ and SERIALIZABLE the transaction's
        snapshot is fixed by its first statement when that statement starts: a
        lock taken inside the transaction would take the snapshot and then wait,
        and the write would run after the previous holder's COMMIT but see the
        database as it was before it. There the lock is a session lock, taken
        outside any transaction before BEGIN goes out; :meth:`release` unlocks it
        when the transaction has ended, before the connection serves anyone else.
        A connection that dies holding it loses it with its session.

        The id comes with the server that gave it (:class:`TransactionId`),
        learnt in the same message by a connection's first BEGIN (a message
        more would leave a moment where the server could end the session
        unseen: see _failed_while_idle): a connection reaches one server for its
        whole life, and that server one timeline while it takes writes (a
        primary never changes timeline; a promoted standby took no writes
        before). Behind a pooler the server of a client connection can change
        at a failover: the id is then tagged with the old server, and a COMMIT
        cut off is never resolved by the new one's answer (UNKNOWN, the safe side).
        """
        if self.coordination != "advisory":
            return None  # BEGIN goes out with the write's first statement
        lock = _lock_id(self.namespace, key)
        adapter = _adapter(conn)
        server = conn.info.get(_SERVER)
        snapshot = adapter is not None and self._snapshot(adapter)
        if adapter is None or getattr(adapter, "_transaction", True) is not None:
            if snapshot:
                raise ConfigurationError(
                    "a write at REPEATABLE READ or SERIALIZABLE must take the key's lock "
                    "before its transaction begins, and this connection is already in one; "
                    "writeturn begins each write's transaction itself: do not begin one on "
                    "its connection"
                )
            # Not the adapter this was written against, or SQLAlchemy already
            # has a transaction on it: the lock as an ordinary statement.
            if server is None:
                server = _server_id((await conn.exec_driver_sql(self._SERVER_SQL)).one())
                conn.info[_SERVER] = server
            row = (await conn.execute(self._LOCK, {"lock_id": lock})).one()
            return TransactionId(int(row[1]), server)
        # SQLAlchemy's bookkeeping first (the asyncpg adapter sends nothing for
        # it); then BEGIN and the lock straight to the driver: a statement
        # through SQLAlchemy costs several times the driver's own work for
        # this one row.
        await conn.begin()
        driver = adapter.driver_connection
        statement = self._LOCK_SQL
        try:
            async with adapter._execute_mutex:
                if snapshot:
                    # Noted before it is sent: a lock granted as the write was
                    # stopped is released all the same.
                    conn.info[_SESSION_LOCK] = lock
                    statement = f"SELECT pg_advisory_lock({int(lock)})"
                    await driver.execute(statement)
                    if _failed_while_idle(driver):
                        # The server ended the session as it granted the lock (its
                        # FATAL read with the grant, the close not yet). COPY would
                        # make its future before refusing, and the close would fail
                        # that future unseen: closed now, the BEGIN below is refused
                        # before anything is made or sent.
                        driver.terminate()
                one = _OneMessageBegin.prepare(
                    adapter, None if snapshot else lock, ask_server=server is None
                )
                if one is not None:
                    statement = one.query
                    number, told = await one.send()
                    if told is not None:
                        server = conn.info[_SERVER] = told
                    assert server is not None
                    return TransactionId(number, server)
                if server is None:
                    statement = self._SERVER_SQL
                    server = conn.info[_SERVER] = _server_id(await driver.fetchrow(statement))
                # The adapter's own start: asyncpg's Transaction object, its
                # _top_xact and SQLAlchemy's adapter._transaction agree, so
                # COMMIT, ROLLBACK and begin_nested() work as after a lazy BEGIN.
                await adapter._start_transaction()
                statement = self._TXID_SQL if snapshot else self._LOCK_SQL
                row = await driver.fetchrow(statement, *(() if snapshot else (lock,)))
                # The transaction id is the last column of both.
                return TransactionId(int(row[-1]), server)
        except Exception as exc:
            raise await _wrapped(conn, adapter, exc, statement) from exc

    def holds_lock(self, conn: AsyncConnection) -> bool:
        # Only advisory mode takes one: turn mode's hand-backs skip the lookup.
        return self.coordination == "advisory" and _SESSION_LOCK in conn.info

    async def release(self, conn: AsyncConnection) -> None:
        if _SESSION_LOCK not in conn.info:
            return
        adapter = _adapter(conn)
        if adapter is None or not self.alive(conn):
            # Dead, or its session ended by the server (see _failed_while_idle): the
            # lock went with the session; the caller discards the connection.
            raise ConnectionError("the connection is dead; its session lock ended with it")
        async with adapter._execute_mutex:
            # Every session lock of this connection is writeturn's; unlock_all,
            # unlike unlock, says nothing when the lock was never granted.
            await adapter.driver_connection.execute("SELECT pg_advisory_unlock_all()")
        del conn.info[_SESSION_LOCK]

    async def interrupt(self, conn: AsyncConnection, engine: AsyncEngine) -> None:
        """Send the protocol's CancelRequest for ``conn``'s running statement.

        The request travels on a short connection of its own that carries no
        session, so it needs no connection from the pool (which may be full),
        and a pooler such as PgBouncer forwards it to the server connection the
        statement runs on (``pg_cancel_backend`` on the pid the client sees
        would name the pooler's key, not a backend). This is what asyncpg's own
        query timeouts send; its sender is not public API, so a driver without
        it falls back to ``pg_cancel_backend``.
        """
        driver = _driver(conn)
        if driver is None or driver.is_closed():
            return
        try:
            from asyncpg import connect_utils

            cancel = connect_utils._cancel
            addr, params = driver._addr, driver._params
            pid, secret = driver._protocol.backend_pid, driver._protocol.backend_secret
        except (ImportError, AttributeError):  # an asyncpg without these internals
            async with engine.connect() as control:
                await control.execute(self._CANCEL, {"pid": driver.get_server_pid()})
                await control.rollback()
            return
        try:
            await cancel(
                loop=asyncio.get_running_loop(),
                addr=addr,
                params=params,
                backend_pid=pid,
                backend_secret=secret,
            )
        except ConnectionResetError:
            pass  # some servers reset the cancel connection after reading the request

    def terminate(self, conn: AsyncConnection) -> None:
        driver = _driver(conn)
        if driver is not None:
            driver.terminate()

    def driver_in_transaction(self, conn: AsyncConnection) -> bool:
        driver = _driver(conn)
        return bool(driver is not None and not driver.is_closed() and driver.is_in_transaction())

    async def behind_pooler(self, conn: AsyncConnection) -> bool:
        try:
            backend = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
        except DBAPIError as exc:
            if ErrorKind.STATEMENT_CLASH in classify(self.name, exc):
                raise PoolerMisconfigured("prepared statements clash between its clients") from exc
            raise
        return reached_through_pooler(_driver(conn), backend)

    def alive(self, conn: AsyncConnection) -> bool:
        # asyncpg learns of a closed socket as soon as the event loop sees it,
        # so a connection the server closed while it was idle is known dead.
        # The server's FATAL message comes before the close, and may be read
        # loop turns earlier: such a connection is dead too (_failed_while_idle).
        driver = _driver(conn)
        return driver is not None and not driver.is_closed() and not _failed_while_idle(driver)

    async def commit_outcome(self, engine: AsyncEngine, xid: TransactionId | None) -> Outcome:
        """Learn, on a fresh connection, whether transaction ``xid`` committed: asked of
        ``txid_status``, and believed only from the server that gave the id.

        After a failover the fresh connection may reach another server: the
        promoted standby, on a new timeline, may have given the same number to
        another transaction (see :class:`TransactionId`). Its answer would be
        about that one, so a server other than the id's (another system
        identifier or timeline) tells nothing: UNKNOWN, and the journal (a
        write's idempotency key) is asked next, which answers on any server.
        """
        if xid is None:
            return Outcome.UNKNOWN
        # The backend of the lost connection may still be finishing: poll
        # until Postgres has decided (a few seconds at most).
        failures = 0
        for _ in range(50):
            try:
                async with engine.connect() as conn:
                    row = (await conn.execute(self._STATUS, {"xid": xid.number})).one()
                    await conn.rollback()
            except Exception as exc:  # the server may be restarting: ask again
                failures += 1
                # Said once per COMMIT, not at every poll; the caller reports the end.
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "writeturn: could not learn the outcome of xid %s (%s); asking again "
                    "for a few seconds",
                    xid.number,
                    exc,
                )
                await asyncio.sleep(0.1)
                continue
            status, server = row[0], _server_id(row[1:])
            if server != xid.server:
                log.warning(
                    "writeturn: the outcome of xid %s is asked of another server than the one "
                    "that gave it (system %s timeline %s, not system %s timeline %s: a "
                    "failover?); its answer would be about another transaction",
                    xid.number,
                    *server,
                    *xid.server,
                )
                return Outcome.UNKNOWN
            if status == "committed":
                return Outcome.COMMITTED
            if status == "aborted":
                return Outcome.ROLLED_BACK
            if status is None:  # too old to know (wrapped around): cannot tell
                return Outcome.UNKNOWN
            await asyncio.sleep(0.1)
        return Outcome.UNKNOWN


class PoolerMisconfigured(Exception):
    """The database answers through a pooler that breaks the driver's statement cache."""


def for_transaction_pooler(url: URL, engine_options: dict[str, Any]) -> tuple[URL, dict[str, Any]]:
    """The URL and engine options that make asyncpg safe behind PgBouncer in transaction mode.

    Prepared statements live on one server connection, which the pooler hands
    to another client after each transaction: asyncpg's statement cache and
    SQLAlchemy's are turned off, and every statement gets a unique name, so no
    client's statement ever meets another's.
    """
    connect_args = dict(engine_options.get("connect_args") or {})
    connect_args.setdefault("statement_cache_size", 0)
    connect_args.setdefault("prepared_statement_name_func", _unique_statement_name)
    options = {**engine_options, "connect_args": connect_args}
    return url.update_query_dict({"prepared_statement_cache_size": "0"}), options


def _unique_statement_name() -> str:
    return f"__writeturn_{uuid.uuid4().hex}__"


#: The key under which a connection's ``info`` keeps its server's :data:`ServerId`.
_SERVER = "writeturn_server"


def _server_id(row: Any) -> ServerId:
    """(system identifier, timeline) from a row (system_identifier, WAL file name):
    the timeline is the first eight hex digits of a WAL file's name."""
    return int(row[0]), int(str(row[1])[:8], 16)


def _driver(conn: AsyncConnection) -> Any:
    """The driver's own connection object under ``conn`` (aiosqlite's or asyncpg's)."""
    return conn.sync_connection.connection.driver_connection if conn.sync_connection else None


def _failed_while_idle(driver: Any) -> bool:
    """Whether asyncpg's protocol holds an error while no operation runs on it.

    The server ended the session (``pg_terminate_backend``, a shutdown) while the
    connection sat idle: its FATAL message has been read, the close of the
    socket not yet. The protocol then refuses every operation until the close
    arrives, and its COPY (the one-message BEGIN) refuses only after it made
    the future for the operation: the close fails that future, and nobody ever
    retrieves its ConnectionDoesNotExistError. Such a connection is discarded
    before anything is sent on it. The protocol's fields are not public: the
    error is found among the objects it refers to (None when it is idle).
    """
    protocol = getattr(driver, "_protocol", None)
    if protocol is None:
        return False
    return any(isinstance(ref, BaseException) for ref in gc.get_referents(protocol))


def _adapter(conn: AsyncConnection) -> Any:
    """SQLAlchemy's asyncpg adapter under ``conn`` (None if it is not that adapter)."""
    sync = conn.sync_connection
    if sync is None or sync.invalidated:
        return None
    adapter = sync.connection.dbapi_connection
    if not all(hasattr(adapter, name) for name in ("_start_transaction", "_execute_mutex")):
        return None
    return adapter


class _OneMessageBegin:
    """BEGIN, the advisory lock and the transaction id in one message, one round trip.

    asyncpg's own start of a transaction is a message of its own, and the lock
    with ``txid_current()`` would be a second: together a round trip more than
    a plain write, whose BEGIN SQLAlchemy sends with its first statement. The
    simple-query protocol takes several statements in one message; the
    transaction id comes back as the COPY data of the last one (the only
    rows asyncpg reads from a simple query). The lock id is an integer the
    library computed, so nothing from outside enters the text.

    Before it sends, it sets up what asyncpg's ``Transaction.start()`` and the
    adapter's ``_start_transaction()`` would have: a started top-level
    ``Transaction`` and the adapter's reference to it, so COMMIT, ROLLBACK and
    savepoints go through them as after their own BEGIN. If the message
    fails, they keep the transaction only where BEGIN took effect (the
    server is in a transaction, aborted or not: the usual ROLLBACK ends it).
    These are asyncpg's and the adapter's internals: :meth:`prepare` returns
    None where they are not as expected, and BEGIN then goes the adapter's way.
    """

    __slots__ = ("adapter", "driver", "transaction", "query", "chunks")

    _ISOLATION: ClassVar[dict[str | None, str]] = {
        None: "",
        "read_committed": " ISOLATION LEVEL READ COMMITTED",
        "read_uncommitted": " ISOLATION LEVEL READ UNCOMMITTED",
        "repeatable_read": " ISOLATION LEVEL REPEATABLE READ",
        "serializable": " ISOLATION LEVEL SERIALIZABLE",
    }

    def __init__(self, adapter: Any, driver: Any, transaction: Any, query: str) -> None:
        self.adapter = adapter
        self.driver = driver
        self.transaction = transaction
        self.query = query
        self.chunks: list[bytes] = []

    @classmethod
    def prepare(
        cls, adapter: Any, lock: int | None, *, ask_server: bool = False
    ) -> _OneMessageBegin | None:
        """The message for ``adapter``'s connection, with the lock on ``lock`` unless None
        (a session lock was taken before: see ``PostgresDialect.begin``), and, with
        ``ask_server``, the server's system identifier and timeline beside the id (a
        connection's first BEGIN: see :class:`TransactionId`)."""
        driver = adapter.driver_connection
        isolation = getattr(adapter, "isolation_level", "?")
        if (
            _TransactionState is None
            or isolation not in cls._ISOLATION
            or not hasattr(getattr(driver, "_protocol", None), "copy_out")
            or getattr(driver, "_top_xact", "?") is not None
            or driver.is_in_transaction()
        ):
            return None
        readonly, deferrable = bool(adapter.readonly), bool(adapter.deferrable)
        begin = "BEGIN" + cls._ISOLATION[isolation]
        if readonly:
            begin += " READ ONLY"
        if deferrable:
            begin += " DEFERRABLE"
        locking = "" if lock is None else f" SELECT pg_advisory_xact_lock({int(lock)});"
        row = f"SELECT txid_current(), {_SERVER_COLUMNS}" if ask_server else "SELECT txid_current()"
        query = f"{begin};{locking} COPY ({row}) TO STDOUT"
        transaction = driver.transaction(
            isolation=isolation, readonly=readonly, deferrable=deferrable
        )
        return cls(adapter, driver, transaction, query)

    async def send(self) -> tuple[int, ServerId | None]:
        """BEGIN; the transaction id, and the server if it was asked for."""
        adapter, driver, transaction = self.adapter, self.driver, self.transaction
        transaction._state = _TransactionState.STARTED
        driver._top_xact = transaction
        adapter._transaction = transaction
        if hasattr(adapter, "_started"):  # SQLAlchemy 2.0's adapter
            adapter._started = True
        try:
            await driver._protocol.copy_out(self.query, self._sink, None)
        except BaseException as exc:
            if not driver.is_closed() and (
                getattr(exc, "severity", None) in ("FATAL", "PANIC")
                or "cannot switch to state" in str(exc)
            ):
                # The server ended the session (its FATAL error comes before the
                # socket's close, and asyncpg's COPY reports it at once), or the
                # protocol is still inside an operation such an end cut short:
                # the connection cannot be used again. Closed now, it is
                # discarded like any dead one, and BEGIN takes a fresh one.
                driver.terminate()
            if driver.is_closed() or not driver.is_in_transaction():
                self._forget()
            raise
        # COPY's text format: the columns separated by tabs, the row ended by a newline.
        number, *server = b"".join(self.chunks).decode().split("\t")
        return int(number), (_server_id(server) if server else None)

    async def _sink(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def _forget(self) -> None:
        """BEGIN did not take effect: nobody may think a transaction is open."""
        self.transaction._state = _TransactionState.FAILED
        if self.driver._top_xact is self.transaction:
            self.driver._top_xact = None
        self.adapter._transaction = None
        if hasattr(self.adapter, "_started"):
            self.adapter._started = False


async def _wrapped(
    conn: AsyncConnection, adapter: Any, exc: Exception, statement: str
) -> DBAPIError:
    """``exc`` from a driver call as SQLAlchemy would have raised it: a DBAPIError,
    with the connection invalidated if the call found it closed."""
    orig: BaseException = exc
    try:
        adapter._handle_exception(exc)  # translates to the adapter's DB-API error and raises
    except Exception as translated:
        orig = translated
    dialect = conn.dialect
    lost = bool(dialect.is_disconnect(orig, adapter, None))  # type: ignore[arg-type]
    wrapped = DBAPIError.instance(
        statement, None, orig, dialect.loaded_dbapi.Error, dialect=dialect
    )
    if not isinstance(wrapped, DBAPIError):
        wrapped = DBAPIError(statement, None, orig)
    # As SQLAlchemy's handle_error would (see _error_kinds.install): a server that
    # takes no writes (a standby first in the host list) is a lost connection.
    if lost or ErrorKind.UNWRITABLE in classify(dialect.name, wrapped):
        retire_generation(conn)
        await conn.invalidate(orig)
        wrapped.connection_invalidated = True
    return wrapped


def dialect_for(engine: AsyncEngine, coordination: Coordination, namespace: str) -> Dialect:
    """Pick the dialect for ``engine``, or raise :class:`UnsupportedDatabase`."""
    name, driver = engine.dialect.name, engine.dialect.driver
    if name == "sqlite" and driver == "aiosqlite":
        return SQLiteDialect(coordination, namespace)
    if name == "postgresql" and driver == "asyncpg":
        return PostgresDialect(coordination, namespace)
    raise UnsupportedDatabase(
        f"engine uses {name}+{driver}; writeturn supports sqlite+aiosqlite and "
        "postgresql+asyncpg. Create the engine with create_async_engine("
        "'sqlite+aiosqlite:///app.db') or ('postgresql+asyncpg://user@host/db')"
    )


def configure_sqlite_engine(engine: AsyncEngine, *, synchronous: str, busy_timeout: float) -> None:
    """Set the pragmas writeturn relies on for every new connection of an engine it owns.

    WAL lets readers run beside the writer; ``synchronous=NORMAL`` in WAL mode
    keeps the database consistent after a crash but may lose the last commits
    on power loss, while ``FULL`` makes each COMMIT durable at the cost of a
    flush per transaction.
    """
    sync = synchronous.upper() if isinstance(synchronous, str) else synchronous
    if sync not in SQLITE_SYNCHRONOUS:
        raise ConfigurationError(
            f"sqlite_synchronous={shown(synchronous)} is not a SQLite synchronous level; "
            f"use one of {', '.join(SQLITE_SYNCHRONOUS)} (NORMAL is the default, FULL is durable)"
        )
    seconds = check_busy_timeout(busy_timeout)
    timeout_ms = int(seconds * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sync}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={timeout_ms}")
        finally:
            cursor.close()
