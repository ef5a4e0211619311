"""No orphaned driver errors: whatever stops a write, asyncio has nothing to report.

A future whose exception nobody retrieved is logged by asyncio ("Future exception
was never retrieved") when it is collected: in a user's log it looks like a failure
of their application. Two storms that used to leave such futures behind: writes
stopped while their connection was being opened (asyncpg negotiating SSL with
the default ``sslmode=prefer``), and backends terminated while a write's
connection had an operation pending. Each storm records what the event loop
reports, collects garbage at the end so orphaned futures are reported, and
checks the writes' outcomes against the database.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from writeturn import Outcome, WriteHandle
from writeturn.dialects import lock_id

from ._db import (
    counter,
    create_tables,
    increment,
    ledger,
    loop_reports,
    pg_leftovers,
    quietly,
    record,
    serializer,
)
from ._proxy import PROXIED, CuttingProxy
from .test_seams import until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

APP = "wt-orphans"
UNDER_TEST: dict[str, Any] = {"connect_args": {"server_settings": {"application_name": APP}}}


def _verify(url: str) -> Any:
    """An engine of the test's own, to read what the database holds."""
    return create_async_engine(url, poolclass=NullPool)


async def _check_outcomes(
    url: str, handles: dict[tuple[str, int], WriteHandle[Any]]
) -> Counter[Outcome]:
    """Exactly the COMMITTED writes are in the database, once each; nothing is left open."""
    assert all(h.done() for h in handles.values())
    outcomes = Counter(h.outcome for h in handles.values())
    committed = {k for k, h in handles.items() if h.outcome is Outcome.COMMITTED}
    unknown = {k for k, h in handles.items() if h.outcome is Outcome.UNKNOWN}
    verify = _verify(url)
    try:
        rows = await ledger(verify)
        in_db = [(r[2], r[3]) for r in rows]
        assert len(in_db) == len(set(in_db))
        assert committed <= set(in_db)
        assert set(in_db) - committed <= unknown
        keys = {r[1] for r in rows}
        for key in keys:
            assert await counter(verify, key) == sum(r[1] == key for r in rows)
        assert await pg_leftovers(verify) == (0, 0)
    finally:
        await verify.dispose()
    return outcomes


# -- 1. writes stopped while their connection is being opened ---------------------------

CONNECT_SEED = 20261207
CONNECT_ROUNDS = 10
CONNECT_WIDTH = 16  # writes at once, each on its own key: each opens a connection


async def test_writes_stopped_while_connecting_leave_nothing_for_asyncio_to_report(
    pg_url: str,
) -> None:
    # The default URL: asyncpg asks for SSL first (sslmode=prefer), the path whose
    # cancellation used to leave an unretrieved future. NullPool opens a connection
    # for every checkout, so each write's stop can land inside a connect.
    rnd = random.Random(CONNECT_SEED)
    keys = [f"k{i}" for i in range(CONNECT_WIDTH)]
    handles: dict[tuple[str, int], WriteHandle[Any]] = {}
    plans: Counter[str] = Counter()
    with loop_reports() as reports:
        async with serializer(pg_url, poolclass=NullPool) as ser:
            await create_tables(ser.engine, *keys)
            connect_time = await _time_a_connect(pg_url)
            for n in range(CONNECT_ROUNDS):
                loop = asyncio.get_running_loop()
                batch = []
                for key in keys:
                    plan = rnd.choice(("cancel", "cancel", "timeout", "none"))
                    plans[plan] += 1
                    at = rnd.uniform(0, 2 * connect_time)
                    h = ser.submit(
                        _write,
                        key,
                        key,
                        n,
                        key=key,
                        writer=key,
                        timeout=at if plan == "timeout" else None,
                    )
                    if plan == "cancel":
                        loop.call_later(at, h.cancel)
                    handles[(key, n)] = h
                    batch.append(quietly(h))
                await asyncio.gather(*batch)
            outcomes = await _check_outcomes(pg_url, handles)
            # The storm stopped writes before and after they began, and let some through.
            assert outcomes[Outcome.COMMITTED] > 0, outcomes
            assert outcomes[Outcome.WITHDRAWN] + outcomes[Outcome.ROLLED_BACK] > 40, outcomes
            await ser.run(record, "k0", "after", 0, key="k0", timeout=10)
    print(f"\nconnect {connect_time * 1000:.1f} ms; plans {dict(plans)}; outcomes {dict(outcomes)}")
    assert reports == [], f"{len(reports)} reports, e.g. {reports[:3]}"


async def _write(session: AsyncSession, key: str, writer: str, seq: int) -> None:
    await increment(session, key)
    await record(session, key, writer, seq)


async def _time_a_connect(url: str) -> float:
    """How long opening one connection takes here (the median of five)."""
    engine = create_async_engine(url, poolclass=NullPool)
    loop = asyncio.get_running_loop()
    times = []
    try:
        for _ in range(5):
            began = loop.time()
            async with engine.connect():
                times.append(loop.time() - began)
    finally:
        await engine.dispose()
    return sorted(times)[2]


# -- 2. backends terminated while writes run, in advisory mode ------------------------------

KILL_SEED = 20261208
KILL_WRITERS, KILL_WRITES = 8, 60
KILL_KEYS = ("a", "b")
BACKENDS_UNDER_TEST = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND pid <> pg_backend_pid() AND application_name = $1 ORDER BY pid"
)


@pytest.mark.parametrize("seed", [KILL_SEED, KILL_SEED + 1, KILL_SEED + 2])
async def test_backends_terminated_under_writes_leave_nothing_for_asyncio_to_report(
    pg_url: str, seed: int
) -> None:
    rnd = random.Random(seed)
    handles: dict[tuple[str, int], WriteHandle[Any]] = {}
    with loop_reports() as reports:
        async with serializer(pg_url, coordination="advisory", batch_max=1, **UNDER_TEST) as ser:
            await create_tables(ser.engine, *KILL_KEYS)
            stop = asyncio.Event()
            kills = asyncio.ensure_future(_killer(pg_url, random.Random(seed + 100), stop))

            async def writer(i: int) -> None:
                name, key = f"w{i}", KILL_KEYS[i % len(KILL_KEYS)]
                seq = 0
                while seq < KILL_WRITES:
                    burst = []
                    for _ in range(rnd.randint(1, 8)):
                        if seq == KILL_WRITES:
                            break
                        h = ser.submit(_write, key, name, seq, key=key, writer=name)
                        handles[(name, seq)] = h
                        burst.append(quietly(h))
                        seq += 1
                    await asyncio.gather(*burst)

            try:
                async with asyncio.timeout(120):
                    await asyncio.gather(*(writer(i) for i in range(KILL_WRITERS)))
            finally:
                stop.set()
                killed = await kills
            outcomes = await _check_outcomes(pg_url, handles)
    print(f"\n{killed} kills; outcomes {dict(outcomes)}")
    assert killed >= 20
    assert outcomes[Outcome.COMMITTED] > 0, outcomes
    assert reports == [], f"{len(reports)} reports, e.g. {reports[:3]}"


async def _connect(url: str) -> asyncpg.Connection:
    """A connection of the test's own, straight to the server."""
    u = make_url(url)
    return await asyncpg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password,
        database=u.database,
        timeout=5,
    )


async def _killer(url: str, rnd: random.Random, stop: asyncio.Event) -> int:
    """Terminate one of the serializer's backends at random moments; return how many."""
    conn = await _connect(url)
    killed = 0
    try:
        while not stop.is_set():
            await asyncio.sleep(rnd.uniform(0.002, 0.02))
            pids = [r[0] for r in await conn.fetch(BACKENDS_UNDER_TEST, APP)]
            if pids and await conn.fetchval("SELECT pg_terminate_backend($1)", rnd.choice(pids)):
                killed += 1
    finally:
        await conn.close()
    return killed


# -- 3. a session ended just as its key's session lock was granted ------------------------

HELD_KEY = "held"
WAITING_FOR_THE_LOCK = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
)
GRANTED_AND_IDLE = "SELECT pid FROM pg_stat_activity WHERE pid = $1 AND state = 'idle'"


async def test_a_session_ended_as_its_lock_is_granted_leaves_nothing_for_asyncio_to_report(
    pg_url: str,
) -> None:
    # At REPEATABLE READ the key's lock is a session lock taken before BEGIN. Here
    # the server grants it and, before the client has read the grant, ends the
    # session: the relay hands the client the grant and the FATAL error in one
    # read, and the socket's close a moment later. The write must go on from a
    # fresh connection, with no orphaned driver future left behind.
    blocker = await _connect(pg_url)
    with loop_reports() as reports:
        async with CuttingProxy(pg_url) as proxy:
            async with serializer(
                proxy.url,
                coordination="advisory",
                batch_max=1,
                isolation_level="REPEATABLE READ",
                connect_args={
                    **PROXIED["connect_args"],
                    "server_settings": {"application_name": APP},
                },
            ) as ser:
                await create_tables(ser.engine, HELD_KEY)
                await blocker.execute(
                    "SELECT pg_advisory_lock($1)", lock_id(ser.namespace, HELD_KEY)
                )
                h = ser.submit(_write, HELD_KEY, "w", 0, key=HELD_KEY, writer="w")
                pid = await _until(blocker, WAITING_FOR_THE_LOCK, APP)
                proxy.hold()
                await blocker.execute("SELECT pg_advisory_unlock_all()")
                await _until(blocker, GRANTED_AND_IDLE, pid)
                assert await blocker.fetchval("SELECT pg_terminate_backend($1)", pid)
                assert await until(lambda: proxy.closed_while_held() == 1, 5.0)
                proxy.release(linger=0.3)
                assert await asyncio.wait_for(h, 30) is None
                outcomes = await _check_outcomes(pg_url, {("w", 0): h})
    await blocker.close()
    assert outcomes == Counter({Outcome.COMMITTED: 1})
    assert reports == [], reports


async def _until(conn: asyncpg.Connection, query: str, arg: Any) -> Any:
    """The first value ``query`` returns, asked every 10 ms for up to 5 s."""
    for _ in range(500):
        value = await conn.fetchval(query, arg)
        if value is not None:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"nothing from {query!r} ({arg!r}) in 5 s")
