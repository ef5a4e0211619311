"""Postgres advisory mode sends BEGIN and the lock straight to the driver: SQLAlchemy's,
the adapter's and asyncpg's view of the transaction must still agree, through COMMIT,
ROLLBACK, savepoints, an isolation level, a lock wait cut by a timeout, and the reuse of
the connection by the next write."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine

from writeturn import Outcome, TurnTimeout, WriteSerializer, dialects
from writeturn.dialects import PostgresDialect, lock_id

from ._db import create_tables, ledger, pg_leftovers, record
from .test_connections import _asyncpg_kwargs

pytestmark = pytest.mark.postgres

HELD_BY_ME = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND pid = pg_backend_pid()"
)


class Boom(Exception):
    pass


@pytest.fixture(params=["one message", "the adapter's BEGIN"])
def begin_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways BEGIN goes: in one message with the lock, and, where asyncpg's
    internals are not as expected, the adapter's own BEGIN then the lock."""
    if request.param != "one message":
        monkeypatch.setattr(
            dialects._OneMessageBegin, "prepare", classmethod(lambda *a, **kw: None)
        )
    return str(request.param)


async def test_every_view_of_the_transaction_agrees(pg_url: str, begin_path: str) -> None:
    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(
            pg_url, coordination="advisory", isolation_level="SERIALIZABLE"
        ) as ser,
    ):
        await create_tables(ser.engine)
        seen: list[tuple[str, int, bool]] = []

        async def write(session: AsyncSession, i: int, fail: bool = False) -> None:
            conn = await session.connection()
            level = (await session.execute(text("SHOW transaction_isolation"))).scalar_one()
            held = int((await session.execute(text(HELD_BY_ME))).scalar_one())
            seen.append((str(level), held, conn.in_transaction()))
            await record(session, "k", "w", i)
            try:
                async with session.begin_nested():
                    await record(session, "k", "nested", i)
                    raise Boom  # rolls back the savepoint only
            except Boom:
                pass
            async with session.begin_nested():
                await record(session, "k", "kept", i)
            if fail:
                raise Boom

        for i in range(6):
            h = ser.submit(write, i, fail=i % 3 == 1, key="k")
            if i % 3 == 1:
                with pytest.raises(Boom):
                    await h
                assert h.outcome is Outcome.ROLLED_BACK
            else:
                await h
                assert h.outcome is Outcome.COMMITTED
        # The isolation level of the engine, the key's lock held, SQLAlchemy in the
        # transaction: every write, on a fresh or a reused connection.
        assert seen == [("serializable", 1, True)] * 6
        rows = [(r[2], r[3]) for r in await ledger(ser.engine)]
        assert rows == [(w, i) for i in (0, 2, 3, 5) for w in ("w", "kept")]
        assert ser.stats().connections_invalidated == 0
        assert await pg_leftovers(ser.engine) == (0, 0)


async def test_a_lock_wait_cut_by_a_timeout_leaves_the_connection_usable(
    pg_url: str, begin_path: str
) -> None:
    holder = await asyncpg.connect(**_asyncpg_kwargs(pg_url))
    try:
        async with (
            asyncio.timeout(60),
            WriteSerializer.from_url(pg_url, coordination="advisory", cancel_grace=0.05) as ser,
        ):
            await create_tables(ser.engine)
            await ser.run(record, "k", "first", 0, key="k")  # a connection to reuse
            await holder.execute("BEGIN")
            await holder.execute("SELECT pg_advisory_xact_lock($1)", lock_id("writeturn", "k"))
            h = ser.submit(record, "k", "blocked", 1, key="k", timeout=0.3)
            with pytest.raises(TurnTimeout):
                await h
            assert h.outcome is Outcome.ROLLED_BACK  # BEGIN had gone out
            await holder.execute("ROLLBACK")
            for i in range(2, 5):
                await ser.run(record, "k", "after", i, key="k", timeout=10)
            assert [r[2] for r in await ledger(ser.engine)] == ["first", "after", "after", "after"]
            assert ser.stats().connections_invalidated == 0
            assert await pg_leftovers(ser.engine) == (0, 0)
    finally:
        await holder.close()


async def test_a_connection_found_dead_at_begin_is_invalidated(
    pg_url: str, begin_path: str
) -> None:
    """Killed while idle, or while its lock waits: BEGIN raises what SQLAlchemy would
    (a DBAPIError saying the connection was invalidated), so the write takes a fresh one."""
    engine = create_async_engine(pg_url)
    dialect = PostgresDialect("advisory", "writeturn")
    killer = await asyncpg.connect(**_asyncpg_kwargs(pg_url))
    try:
        async with asyncio.timeout(30):
            idle = await engine.connect()
            pid = (await idle.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
            await idle.rollback()
            await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.2)  # the driver sees the socket close
            with pytest.raises(DBAPIError) as dead:
                await dialect.begin(idle, "k")
            assert dead.value.connection_invalidated and idle.invalidated
            await idle.close()

            waiting = await engine.connect()
            pid = (await waiting.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
            await waiting.rollback()
            await killer.execute("BEGIN")
            await killer.execute("SELECT pg_advisory_xact_lock($1)", lock_id("writeturn", "k"))
            begin = asyncio.ensure_future(dialect.begin(waiting, "k"))
            await asyncio.sleep(0.2)  # BEGIN went through; the lock waits
            await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(DBAPIError) as cut:
                await begin
            assert cut.value.connection_invalidated and waiting.invalidated
            await waiting.close()
            await killer.execute("ROLLBACK")
    finally:
        await killer.close()
        await engine.dispose()


async def test_a_fresh_connections_first_begin_is_one_message_too(pg_url: str) -> None:
    """The first advisory BEGIN on a connection also learns which server it reaches
    (the system identifier and timeline its transaction ids belong to), in the same
    message: no round trip more, and no moment between two messages where the
    server could end the session unseen."""
    sent: list[bytes] = []
    async with asyncio.timeout(60):
        async with WriteSerializer.from_url(pg_url, coordination="advisory") as ser:
            await create_tables(ser.engine)

            @event.listens_for(ser.engine.sync_engine, "connect")
            def count_writes(dbapi_connection: Any, _record: Any) -> None:
                transport = dbapi_connection.driver_connection._transport
                write = transport.write

                def counted(data: bytes) -> None:
                    sent.append(bytes(data))
                    write(data)

                transport.write = counted

            # Every connection the pool holds was made before the listener: a fresh one.
            await ser.engine.dispose()
            await ser.run(record, "k", "w", 1, key="k")
            # The first message is BEGIN with the lock, the id and the server; nothing
            # else asks for the server. (The INSERT is prepared on a fresh connection:
            # one message more than on a warm one, BEGIN's count unchanged.)
            assert sent[0].startswith(b"Q") and b"BEGIN" in sent[0], sent
            assert [b"pg_control_system" in m for m in sent].count(True) == 1, sent
            assert b"pg_control_system" in sent[0]
            sent.clear()
            await ser.run(record, "k", "w", 2, key="k")
            assert len(sent) == 3 and b"pg_control_system" not in sent[0], sent


async def test_begin_and_the_lock_travel_in_one_message(pg_url: str) -> None:
    """An advisory write costs the round trips of a plain one: BEGIN, the lock and the
    transaction id go out together, so a one-statement write sends three messages
    (BEGIN with the lock, the statement, COMMIT), as SQLAlchemy's lazy BEGIN does."""
    sent: list[bytes] = []

    def count_writes(conn: AsyncConnection) -> None:
        transport = conn.sync_connection.connection.driver_connection._transport  # type: ignore[union-attr]
        write = transport.write

        def counted(data: bytes) -> None:
            sent.append(bytes(data))
            write(data)

        transport.write = counted

    async with asyncio.timeout(60):
        for coordination, expected in (("turn", 3), ("advisory", 3)):
            async with WriteSerializer.from_url(pg_url, coordination=coordination) as ser:
                await create_tables(ser.engine)
                async with ser.transaction(key="k") as session:
                    count_writes(await session.connection())
                    sent.clear()
                    await record(session, "k", "w", 1)
                # The connection is parked between writes: the next write reuses it.
                sent.clear()
                h = ser.submit(record, "k", "w", 2, key="k")
                await h
                assert h.outcome is Outcome.COMMITTED
                assert len(sent) == expected, (coordination, sent)
                async with ser.engine.begin() as conn:
                    await conn.exec_driver_sql("DROP TABLE ledger, counter")
        # BEGIN still returns the transaction id (it resolves a COMMIT cut off), and the
        # lock is held in a transaction that SQLAlchemy knows and ends.
        engine = create_async_engine(pg_url)
        try:
            async with engine.connect() as conn:
                xid = await PostgresDialect("advisory", "writeturn").begin(conn, "k")
                assert xid is not None
                assert conn.in_transaction()
                assert xid.number == (await conn.exec_driver_sql("SELECT txid_current()")).scalar()
                assert (await conn.exec_driver_sql(HELD_BY_ME)).scalar() == 1
                await conn.rollback()
                assert (await conn.exec_driver_sql(HELD_BY_ME)).scalar() == 0
                await conn.rollback()
        finally:
            await engine.dispose()
