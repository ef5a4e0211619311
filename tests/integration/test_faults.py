"""Faults from outside the process: backends terminated, a socket cut around COMMIT, the
server stopped and started, a writer process killed while it holds the lock, statements
stuck behind another connection's lock, and shutdown with writes in flight.

Every test checks the database afterwards: what was reported COMMITTED is there exactly
once, nothing else is, and nothing is left half-applied or holding a lock.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from writeturn import (
    ConnectionLost,
    DatabaseUnreachable,
    Outcome,
    OutcomeUnknown,
    SerializerClosed,
    TurnTimeout,
    WriteHandle,
    WriteSerializer,
    WriteturnError,
)

from ._db import (
    counter,
    create_tables,
    increment,
    ledger,
    pg_leftovers,
    quietly,
    record,
    serializer,
)
from ._proxy import PROXIED, CuttingProxy

APP = "wt-under-test"
UNDER_TEST: dict[str, Any] = {"connect_args": {"server_settings": {"application_name": APP}}}

BACKENDS_UNDER_TEST = (
    "SELECT pid, coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND application_name = $1 ORDER BY pid"
)


def asyncpg_kwargs(url: str) -> dict[str, Any]:
    u = make_url(url)
    return {
        "host": u.host or "127.0.0.1",
        "port": u.port or 5432,
        "user": u.username or "postgres",
        "password": u.password,
        "database": u.database,
    }


def failure_name(exc: BaseException | None) -> str:
    """A failed write's exception, as 'Class(cause class)'."""
    if exc is None:
        return "-"
    cause = exc.__cause__ or getattr(exc, "orig", None)
    return f"{type(exc).__name__}({type(cause).__name__})" if cause else type(exc).__name__


def lost_connection(exc: BaseException | None) -> bool:
    """True if ``exc`` reports a connection that died: ConnectionLost, or OutcomeUnknown
    caused by a connection that died while COMMIT was in flight."""
    if isinstance(exc, ConnectionLost):
        return isinstance(exc.__cause__, DBAPIError)
    if isinstance(exc, OutcomeUnknown):
        exc = exc.__cause__
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


async def terminate_backends(url: str) -> list[int]:
    """End every backend of the serializer under test; return their pids once they are gone."""
    conn = await asyncpg.connect(**asyncpg_kwargs(url), timeout=5)
    try:
        pids = [r[0] for r in await conn.fetch(BACKENDS_UNDER_TEST, APP)]
        for pid in pids:
            assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    finally:
        await conn.close()
    await asyncio.sleep(0.05)  # let the client side read the end of the socket
    return pids


# -- 1. backends terminated at random moments under load -----------------------------------

KILL_SEED = 20260611
KILL_WRITERS, KILL_WRITES = 8, 300
KILL_KEYS = ("a", "b")


@dataclass
class Chaos:
    ser: WriteSerializer
    rnd: random.Random
    handles: dict[tuple[str, int], WriteHandle[Any]] = field(default_factory=dict)
    returned: set[tuple[str, int]] = field(default_factory=set)
    started: dict[tuple[str, int], float] = field(default_factory=dict)
    settled: dict[tuple[str, int], float] = field(default_factory=dict)

    async def write(self, session: AsyncSession, key: str, writer: str, seq: int) -> None:
        self.started[(writer, seq)] = time.monotonic()
        await increment(session, key)
        await record(session, key, writer, seq)
        self.returned.add((writer, seq))

    async def writer(self, i: int) -> None:
        name, key = f"w{i}", KILL_KEYS[i % len(KILL_KEYS)]
        seq = 0
        while seq < KILL_WRITES:
            burst = []
            for _ in range(self.rnd.randint(1, 8)):
                if seq == KILL_WRITES:
                    break
                h = self.ser.submit(self.write, key, name, seq, key=key, writer=name)
                self.handles[(name, seq)] = h
                burst.append(self.settle((name, seq), h))
                seq += 1
            await asyncio.gather(*burst)

    async def settle(self, ident: tuple[str, int], h: WriteHandle[Any]) -> None:
        await quietly(h)
        self.settled[ident] = time.monotonic()


async def killer(url: str, rnd: random.Random, stop: asyncio.Event) -> list[str]:
    """Terminate one of the serializer's backends at random moments; return what each was
    doing. A backend seen asking txid_status is spared, but a kill can still land on a probe
    that began after the pick: the test counts those (the probe logs a warning)."""
    conn = await asyncpg.connect(**asyncpg_kwargs(url), timeout=5)
    killed: list[str] = []
    try:
        while not stop.is_set():
            await asyncio.sleep(rnd.uniform(0.005, 0.04))
            rows = [
                r for r in await conn.fetch(BACKENDS_UNDER_TEST, APP) if "txid_status" not in r[2]
            ]
            if not rows:
                continue
            pid, state, query = rnd.choice(rows)
            if await conn.fetchval("SELECT pg_terminate_backend($1)", pid):
                killed.append(f"{state}: {query.split()[0] if query else ''}")
    finally:
        await conn.close()
    return killed


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize(
    ("coordination", "retries"),
    [
        pytest.param("turn", 0, id="turn"),
        pytest.param("advisory", 0, id="advisory"),
        pytest.param("advisory", 3, id="advisory-retries"),
    ],
)
async def test_backends_terminated_under_load(
    pg_url: str, coordination: str, retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    mode = f"{coordination}, retries={retries}"
    options: dict[str, Any] = {"coordination": coordination, "retries": retries}
    if retries:
        options["retry_backoff"] = 0.005  # a retry keeps the turn while it backs off
    async with serializer(pg_url, **options, **UNDER_TEST) as ser:
        await create_tables(ser.engine, *KILL_KEYS)
        chaos = Chaos(ser, random.Random(KILL_SEED))
        stop = asyncio.Event()
        began = time.monotonic()
        # No stuck turn: the run ends. A hang detector, not a speed limit: about 25 s on
        # a quiet machine, and a loaded one (CI beside other work) may take several times that.
        async with asyncio.timeout(240):
            kills = asyncio.ensure_future(killer(pg_url, random.Random(KILL_SEED + 1), stop))
            try:
                await asyncio.gather(*(chaos.writer(i) for i in range(KILL_WRITERS)))
            finally:
                stop.set()
                killed = await kills
        elapsed = time.monotonic() - began

        handles = chaos.handles
        assert len(handles) == KILL_WRITERS * KILL_WRITES
        assert all(h.done() for h in handles.values())
        outcomes = Counter(h.outcome for h in handles.values())
        by = {o: {k for k, h in handles.items() if h.outcome is o} for o in Outcome}
        failed = [h for h in handles.values() if h.outcome is not Outcome.COMMITTED]
        print(
            f"\n[{mode}] {len(killed)} kills in {elapsed:.1f}s, of backends "
            f"{dict(Counter(killed).most_common())}\n[{mode}] outcomes "
            f"{ {o.value: n for o, n in outcomes.items()} }; errors "
            f"{dict(Counter(failure_name(h.exception()) for h in failed))}"
        )
        assert len(killed) >= 50, killed
        if retries:
            # Lost connections are transient: the writes ran again, and nearly all committed.
            # A backend killed while idle (pooled or parked) is replaced before any write
            # uses it, so only kills inside a transaction call for a retry.
            busy = [k for k in killed if not k.startswith("idle:")]
            assert ser.stats().retries >= len(busy) // 2
            # A write fails only if every one of its attempts lost its connection. Kills
            # come at a steady rate, so a slower (loaded) run sees more of them per write:
            # the bound is a share of the kills, not of the writes (quiet: 8 of 877).
            assert len(failed) <= len(busy) // 20, (len(failed), len(busy))
        else:
            assert failed

        # Read the outcome through an engine of its own: the serializer's pool may still
        # hold a connection that the last kill ended while it sat idle there.
        verify = create_async_engine(pg_url)
        try:
            rows = await ledger(verify)
            # Exactly once: each COMMITTED write has one ledger row; no other write has one,
            # except perhaps one whose COMMIT was cut off (UNKNOWN).
            in_db = [(r[2], r[3]) for r in rows]
            assert len(in_db) == len(set(in_db))
            assert by[Outcome.COMMITTED] <= set(in_db)
            assert set(in_db) - by[Outcome.COMMITTED] <= by[Outcome.UNKNOWN]
            # No partial write: each key's counter moved once per ledger row.
            for key in KILL_KEYS:
                assert await counter(verify, key) == sum(r[1] == key for r in rows)
            # Nothing left holding a lock or a transaction.
            assert await pg_leftovers(verify) == (0, 0)
        finally:
            await verify.dispose()

        # Every failure is a lost connection, and UNKNOWN only where COMMIT itself was cut
        # (the write function had returned).
        assert all(lost_connection(h.exception()) for h in failed), Counter(
            failure_name(h.exception()) for h in failed
        )
        assert by[Outcome.COMMITTED] | by[Outcome.UNKNOWN] <= chaos.returned
        for ident in by[Outcome.UNKNOWN]:
            assert isinstance(handles[ident].exception(), OutcomeUnknown)
        landed = len(by[Outcome.UNKNOWN] & set(in_db))
        print(f"[{mode}] UNKNOWN: {len(by[Outcome.UNKNOWN])}, of which landed: {landed}")
        if coordination == "advisory":
            # txid_status settles every cut-off COMMIT, unless the asking was cut off too.
            probes_cut = sum(
                "could not learn the outcome" in r.getMessage() for r in caplog.records
            )
            print(f"[{mode}] txid_status probes cut off: {probes_cut}")
            assert outcomes[Outcome.UNKNOWN] <= probes_cut, outcomes

        # A write that failed ended soon after it began: the turn passed on at once.
        slowest = max(chaos.settled[k] - chaos.started[k] for k in chaos.started)
        print(f"[{mode}] slowest write, function start to settled: {slowest:.2f}s")
        assert slowest < 6

        # Counts add up; every lost connection was discarded.
        stats = ser.stats()
        print(f"[{mode}] {stats}")
        assert (stats.queued, stats.running) == (0, 0)
        assert stats.committed == outcomes[Outcome.COMMITTED]
        assert stats.rolled_back == outcomes[Outcome.ROLLED_BACK]
        assert stats.withdrawn == outcomes[Outcome.WITHDRAWN]
        assert stats.unknown == outcomes[Outcome.UNKNOWN]
        assert sum(outcomes.values()) == len(handles)
        assert stats.connections_invalidated >= len(failed) + stats.retries

        # The serializer commits again without a restart: at most one failed write per
        # connection killed while it sat idle in the pool (see the idle-pool test below).
        results: list[Any] = []
        while len(results) < 12 and not all(isinstance(r, int) for r in results[-2:] or [None]):
            results.append(await quietly(ser.run(record, "a", "after", 0, key="a", timeout=10)))
        assert all(isinstance(r, int) for r in results[-2:]), results
        assert all(lost_connection(r) for r in results if not isinstance(r, int)), results


# -- 1b. one backend terminated, deterministically --------------------------------------------


async def write_cut_mid_transaction(
    url: str, retries: int = 0
) -> tuple[WriteHandle[Any], WriteSerializer]:
    """A write whose backend is terminated between two of its statements, with another write
    queued behind it. Returns the cut write's handle and the (open) serializer."""
    ser = WriteSerializer.from_url(url, retries=retries, **UNDER_TEST)
    await ser.start()
    await create_tables(ser.engine)
    inside, resume = asyncio.Event(), asyncio.Event()

    async def cut(session: AsyncSession) -> None:
        await increment(session)
        inside.set()
        await resume.wait()
        await record(session, "k", "cut", 1)

    h = ser.submit(cut, key="k", writer="A")
    nxt = ser.submit(record, "k", "next", 2, key="k", writer="B")
    async with asyncio.timeout(10):
        await inside.wait()
        assert len(await terminate_backends(url)) >= 1
        resume.set()
        await quietly(h)
        await nxt  # the turn passed on, and the pool gave it a live connection
    assert nxt.outcome is Outcome.COMMITTED
    return h, ser


@pytest.mark.postgres
async def test_backend_terminated_mid_write_rolls_back_and_passes_the_turn(pg_url: str) -> None:
    h, ser = await write_cut_mid_transaction(pg_url)
    try:
        assert h.outcome is Outcome.ROLLED_BACK
        exc = h.exception()
        print(f"\nmid-write lost connection raises {failure_name(exc)}: {exc!r}"[:300])
        assert lost_connection(exc)
        stats = ser.stats()
        assert (stats.rolled_back, stats.committed, stats.connections_invalidated) == (1, 1, 1)
        assert [r[2] for r in await ledger(ser.engine)] == ["next"]
        assert await counter(ser.engine) == 0  # the cut write's increment is gone too
        assert await pg_leftovers(ser.engine) == (0, 0)
    finally:
        await ser.close()


@pytest.mark.postgres
async def test_backend_terminated_mid_write_runs_again_with_retries(pg_url: str) -> None:
    h, ser = await write_cut_mid_transaction(pg_url, retries=1)
    try:
        assert h.outcome is Outcome.COMMITTED
        stats = ser.stats()
        assert (stats.retries, stats.connections_invalidated, stats.committed) == (1, 1, 2)
        # Applied once: the first attempt's increment was rolled back with its connection.
        assert sorted(r[2] for r in await ledger(ser.engine)) == ["cut", "next"]
        assert await counter(ser.engine) == 1
        assert await pg_leftovers(ser.engine) == (0, 0)
    finally:
        await ser.close()


@pytest.mark.postgres
async def test_backend_terminated_mid_write_raises_a_writeturn_error(pg_url: str) -> None:
    h, ser = await write_cut_mid_transaction(pg_url)
    try:
        exc = h.exception()
        assert isinstance(exc, WriteturnError), repr(exc)
        assert "connection" in str(exc).lower()
    finally:
        await ser.close()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "coordination",
    [
        "turn",
        "advisory",
    ],
)
async def test_commit_on_a_connection_already_lost_is_rolled_back(
    pg_url: str, coordination: str
) -> None:
    async with serializer(pg_url, coordination=coordination, **UNDER_TEST) as ser:
        await create_tables(ser.engine)
        ready, go = asyncio.Event(), asyncio.Event()

        async def write(session: AsyncSession) -> None:
            await increment(session)
            ready.set()
            await go.wait()  # returns after its backend is gone: COMMIT meets a dead socket

        h = ser.submit(write, key="k")
        async with asyncio.timeout(10):
            await ready.wait()
            await terminate_backends(pg_url)
            go.set()
            await quietly(h)
        seen = f"{h.outcome.value} {failure_name(h.exception())}"
        print(f"\n[{coordination}] COMMIT on a lost connection: {seen}")
        assert await counter(ser.engine) == 0
        assert h.outcome is Outcome.ROLLED_BACK, (h.outcome, h.exception())


@pytest.mark.postgres
async def test_connection_killed_while_idle_costs_no_write(pg_url: str) -> None:
    async with serializer(pg_url, **UNDER_TEST) as ser:
        await create_tables(ser.engine)
        await ser.run(increment, key="k", timeout=10)  # its connection now sits idle
        assert len(await terminate_backends(pg_url)) == 1
        result = await quietly(ser.run(increment, key="k", timeout=10))
        assert await counter(ser.engine) == (2 if result == 2 else 1)
        assert result == 2, repr(result)


# -- 1c. the socket cut around COMMIT, and a database nobody can reach ----------------------


async def writes_while_unreachable(pg_url: str) -> list[WriteHandle[Any]]:
    """Writes submitted while nothing answers at the database's address (after one commit);
    then the address answers again and the same serializer must write."""
    async with CuttingProxy(pg_url) as proxy, serializer(proxy.url, **PROXIED) as ser:
        await create_tables(ser.engine)
        await ser.run(increment, key="k", timeout=10)
        await proxy.refuse()
        failed = []
        for _ in range(3):
            began = time.monotonic()
            h = ser.submit(increment, key="k", timeout=10)
            async with asyncio.timeout(10):
                await quietly(h)
            assert h.outcome is not Outcome.COMMITTED
            assert time.monotonic() - began < 3  # fails fast
            failed.append(h)
        await proxy.accept()
        async with asyncio.timeout(20):
            assert await ser.run(increment, key="k", timeout=10) == 2
        assert await counter(ser.engine) == 2
        assert await pg_leftovers(ser.engine) == (0, 0)
    return failed


@pytest.mark.postgres
async def test_unreachable_database_fails_fast_then_recovers(pg_url: str) -> None:
    failed = await writes_while_unreachable(pg_url)
    print(
        f"\nwhile unreachable: {[(failure_name(h.exception()), h.outcome.value) for h in failed]}"
    )
    for h in failed:
        assert h.outcome in (Outcome.ROLLED_BACK, Outcome.WITHDRAWN)
        assert h.exception() is not None


@pytest.mark.postgres
async def test_unreachable_database_raises_database_unreachable(pg_url: str) -> None:
    failed = await writes_while_unreachable(pg_url)
    for h in failed:
        assert isinstance(h.exception(), DatabaseUnreachable), repr(h.exception())


@pytest.mark.postgres
@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_socket_cut_around_commit(pg_url: str, coordination: str, where: str) -> None:
    async with CuttingProxy(pg_url, where) as proxy:
        async with serializer(proxy.url, coordination=coordination, **PROXIED) as ser:
            await create_tables(ser.engine)

            def arm(conn: Any) -> None:  # runs just before COMMIT is sent
                proxy.armed = True

            event.listen(ser.engine.sync_engine, "commit", arm)
            try:
                h = ser.submit(record, "k", "cut", 1, key="k")
                async with asyncio.timeout(15):
                    await quietly(h)
            finally:
                event.remove(ser.engine.sync_engine, "commit", arm)
            assert proxy.cuts == 1
            landed = [r[2] for r in await ledger(ser.engine)] == ["cut"]
            print(
                f"\n[{coordination}, cut {where} COMMIT] outcome {h.outcome.value}, landed {landed}"
            )
            assert landed is (where == "after")
            # Outcome truth, and in advisory mode txid_status tells which way it went.
            if coordination == "advisory":
                assert h.outcome is (Outcome.COMMITTED if landed else Outcome.ROLLED_BACK)
            else:
                # turn mode reads no transaction id, so the fate stays unknown
                assert h.outcome in (
                    Outcome.UNKNOWN,
                    Outcome.COMMITTED if landed else Outcome.ROLLED_BACK,
                )
                if h.outcome is Outcome.UNKNOWN:
                    assert isinstance(h.exception(), OutcomeUnknown)
            if h.outcome is Outcome.COMMITTED:
                assert h.exception() is None
            else:
                assert h.exception() is not None
            assert ser.stats().connections_invalidated == 1
            await ser.run(record, "k", "next", 2, key="k", timeout=10)
            assert await pg_leftovers(ser.engine) == (0, 0)


# -- 2. the server stopped and started again ------------------------------------------------

CONTROL = os.environ.get("WRITETURN_TEST_CONTROL_POSTGRES") == "1"
PG_CTL = shlex.split(
    os.environ.get("WRITETURN_TEST_POSTGRES_CTL", "pg_ctlcluster --skip-systemctl-redirect 15 main")
)


async def pg_ctl(action: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *PG_CTL, action, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{action}: {out.decode()}"


async def wait_for_server(url: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            conn = await asyncpg.connect(**asyncpg_kwargs(url), timeout=2)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            await conn.close()
            return


@pytest.mark.postgres
@pytest.mark.skipif(
    not CONTROL,
    reason="stops and starts the Postgres server for a few seconds; set "
    "WRITETURN_TEST_CONTROL_POSTGRES=1 where that is allowed (the command is "
    "WRITETURN_TEST_POSTGRES_CTL, default 'pg_ctlcluster --skip-systemctl-redirect 15 main')",
)
async def test_server_stopped_and_started_again(pg_url: str) -> None:
    async with serializer(pg_url, connect_args={"timeout": 2}) as ser:
        await create_tables(ser.engine)
        await ser.run(increment, key="k", timeout=10)
        inside, resume = asyncio.Event(), asyncio.Event()

        async def caught(session: AsyncSession) -> None:
            await increment(session)
            inside.set()
            await resume.wait()
            await record(session, "k", "caught", 1)

        in_flight = ser.submit(caught, key="k")
        await asyncio.wait_for(inside.wait(), 10)
        down: list[tuple[str, Outcome, float]] = []
        try:
            await pg_ctl("stop")
            resume.set()
            async with asyncio.timeout(10):
                await quietly(in_flight)
            for _ in range(3):
                began = time.monotonic()
                h = ser.submit(increment, key="k", timeout=10)
                async with asyncio.timeout(10):
                    await quietly(h)
                down.append((failure_name(h.exception()), h.outcome, time.monotonic() - began))
        finally:
            try:
                await pg_ctl("start")
            except AssertionError:  # it may never have stopped: wait for it either way
                pass
            await wait_for_server(pg_url)
        print(
            f"\nin flight: {failure_name(in_flight.exception())} {in_flight.outcome.value}; "
            f"while down: {[(n, o.value, round(t, 2)) for n, o, t in down]}"
        )
        assert in_flight.outcome is Outcome.ROLLED_BACK
        assert lost_connection(in_flight.exception())
        for name, outcome, took in down:
            assert outcome in (Outcome.ROLLED_BACK, Outcome.WITHDRAWN), name
            assert name != "-" and took < 3, (name, took)  # failed, and fast

        # Back up: the same serializer writes again.
        async with asyncio.timeout(20):
            assert await ser.run(increment, key="k", timeout=10) == 2
            assert await ser.run(increment, key="k", timeout=10) == 3
        assert await counter(ser.engine) == 3
        assert await ledger(ser.engine) == []
        assert await pg_leftovers(ser.engine) == (0, 0)


# -- 3. a writer process killed while it holds the lock ------------------------------------

WORKER = Path(__file__).with_name("_fault_worker.py")
SURVIVORS, SURVIVOR_TASKS, SURVIVOR_WRITES, VICTIM_WRITES = 3, 2, 10, 10


@pytest.mark.slow
async def test_writer_process_killed_holding_the_lock(db_url: str, tmp_path: Path) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine)
    go, inside = tmp_path / "go", tmp_path / "inside"

    async def spawn(role: str) -> asyncio.subprocess.Process:
        args = [str(WORKER), db_url, role, str(SURVIVOR_TASKS)]
        args += [str(VICTIM_WRITES if role == "victim" else SURVIVOR_WRITES), str(go), str(inside)]
        return await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    victim = await spawn("victim")
    survivors = [await spawn("survivor") for _ in range(SURVIVORS)]
    try:
        go.touch()
        async with asyncio.timeout(60):
            while not inside.exists():
                assert victim.returncode is None, "the victim exited early"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # the survivors queue up behind the victim's lock
            waiting = await lock_waiters(db_url)
            os.kill(victim.pid, signal.SIGKILL)
            v_out, _ = await victim.communicate()
            results = []
            for proc in survivors:
                out, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()[-2000:]
                results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for proc in (victim, *survivors):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert victim.returncode == -signal.SIGKILL
    victim_committed = json.loads(v_out.decode().strip().splitlines()[-1])["committed"]
    assert victim_committed == VICTIM_WRITES
    print(f"\nsurvivors {results}; waiting on the victim's lock when killed: {waiting}")
    assert all(r["failed"] == [] for r in results), results
    assert all(r["committed"] == 2 * SURVIVOR_TASKS * SURVIVOR_WRITES for r in results)
    committed = sum(r["committed"] for r in results) + victim_committed

    async with serializer(db_url) as ser:
        # Every reported increment, and none from the killed process's open transaction.
        assert await counter(ser.engine) == committed
        assert await pg_leftovers(ser.engine) == (0, 0)
        await ser.run(increment, key="k", timeout=10)
    if db_url.startswith("sqlite"):
        assert waiting is None
        path = make_url(db_url).database
        assert path is not None
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert db.execute("SELECT n FROM counter").fetchall() == [(committed + 1,)]
        finally:
            db.close()
    else:
        assert waiting is not None and waiting >= 1  # survivors did wait on the victim


async def lock_waiters(url: str) -> int | None:
    """Processes waiting for an advisory lock in this database (None on SQLite)."""
    if not url.startswith("postgresql"):
        return None
    conn = await asyncpg.connect(**asyncpg_kwargs(url), timeout=5)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
            )
        )
    finally:
        await conn.close()


# -- 4. a statement stuck behind another connection's lock ---------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_statement_stuck_behind_a_row_lock_times_out(pg_url: str, coordination: str) -> None:
    async with serializer(pg_url, coordination=coordination, cancel_grace=0.05) as ser:
        await create_tables(ser.engine)
        blocker = await asyncpg.connect(**asyncpg_kwargs(pg_url), timeout=5)
        try:
            await blocker.execute("BEGIN")
            await blocker.execute("UPDATE counter SET n = n + 100 WHERE key = 'k'")
            began = time.monotonic()
            stuck = ser.submit(increment, key="k", timeout=1.0)
            async with asyncio.timeout(10):
                with pytest.raises(TurnTimeout, match="while running"):
                    await stuck
            took = time.monotonic() - began
            print(f"\n[{coordination}] TurnTimeout after {took:.2f}s (timeout=1.0)")
            assert 1.0 <= took < 3.0
            assert stuck.outcome is Outcome.ROLLED_BACK
            stats = ser.stats()
            assert stats.interrupts >= 1
            assert stats.connections_invalidated == 0
            # The next write waits on the same row, and proceeds once the blocker is gone.
            nxt = ser.submit(increment, key="k", timeout=10)
            await asyncio.sleep(0.3)
            assert not nxt.done()
            await blocker.execute("ROLLBACK")
            async with asyncio.timeout(10):
                assert await nxt == 1
        finally:
            await blocker.close()
        assert await counter(ser.engine) == 1
        assert ser.stats().connections_invalidated == 0
        assert await pg_leftovers(ser.engine) == (0, 0)


@pytest.mark.parametrize("timeout", [None, 0.3])
async def test_sqlite_write_lock_held_by_another_connection(
    sqlite_url: str, timeout: float | None
) -> None:
    async with serializer(sqlite_url, sqlite_busy_timeout=1.0) as ser:
        await create_tables(ser.engine)
        path = make_url(sqlite_url).database
        assert path is not None
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE counter SET n = n + 100 WHERE key = 'k'")
            began = time.monotonic()
            h = ser.submit(increment, key="k", timeout=timeout)
            async with asyncio.timeout(10):
                exc = await quietly(h)
            took = time.monotonic() - began
            print(f"\n[timeout={timeout}] after {took:.2f}s: {h.outcome.value} {exc!r}"[:300])
            if timeout is None:
                # SQLite's own busy timeout ends the wait.
                assert isinstance(exc, DBAPIError) and "database is locked" in str(exc)
                assert 0.9 <= took < 2.5
            else:
                # writeturn's timeout ends it first, by interrupting the waiting statement.
                assert isinstance(exc, TurnTimeout)
                assert took < 0.3 + 0.5
            assert h.outcome is Outcome.ROLLED_BACK
            nxt = ser.submit(increment, key="k", timeout=10)
            await asyncio.sleep(0.2)
            assert not nxt.done()  # it waits for the lock again
            other.execute("ROLLBACK")
            async with asyncio.timeout(10):
                assert await nxt == 1
        finally:
            other.close()
        assert await counter(ser.engine) == 1
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()


# -- 5. graceful shutdown with writes queued and running -----------------------------------


async def test_close_with_a_timeout_settles_every_write(db_url: str) -> None:
    ser = WriteSerializer.from_url(db_url)
    await ser.start()
    await create_tables(ser.engine)
    long_one = 5

    async def write(session: AsyncSession, i: int) -> None:
        await increment(session)
        await record(session, "k", f"w{i % 3}", i)
        await asyncio.sleep(30 if i == long_one else 0.02)

    handles = [ser.submit(write, i, key="k", writer=f"w{i % 3}") for i in range(40)]
    await asyncio.sleep(0.3)
    began = time.monotonic()
    async with asyncio.timeout(10):
        await ser.close(timeout=0.5)
    took = time.monotonic() - began
    outcomes = Counter(h.outcome for h in handles)
    print(f"\nclose(timeout=0.5) took {took:.2f}s; { ({o.value: n for o, n in outcomes.items()}) }")
    assert 0.5 <= took < 1.5
    assert all(h.done() for h in handles)
    assert handles[long_one].outcome is Outcome.ROLLED_BACK
    assert outcomes[Outcome.ROLLED_BACK] == 1
    assert outcomes[Outcome.COMMITTED] >= 1 and outcomes[Outcome.WITHDRAWN] >= 10
    assert outcomes[Outcome.COMMITTED] + 1 + outcomes[Outcome.WITHDRAWN] == len(handles)
    for h in handles:
        if h.outcome is not Outcome.COMMITTED:
            assert isinstance(h.exception(), SerializerClosed), repr(h.exception())
    with pytest.raises(SerializerClosed):
        ser.submit(write, 99, key="k")

    committed = {i for i, h in enumerate(handles) if h.outcome is Outcome.COMMITTED}
    async with serializer(db_url) as check:
        assert {r[3] for r in await ledger(check.engine)} == committed
        assert await counter(check.engine) == len(committed)
        assert await pg_leftovers(check.engine) == (0, 0)


@pytest.mark.postgres
async def test_a_frozen_server_is_cut_off_after_cleanup_timeout(pg_url: str) -> None:
    """The backend is frozen (SIGSTOP) mid-statement: neither the statement nor a ROLLBACK
    can finish, so after the timeout, cancel_grace and cleanup_timeout the connection is
    terminated, the write ends ROLLED_BACK, and the turn passes on."""
    async with serializer(pg_url, cancel_grace=0.05, cleanup_timeout=0.5) as ser:
        await create_tables(ser.engine)
        pid_box: list[int] = []
        inside, frozen = asyncio.Event(), asyncio.Event()

        async def write(session: AsyncSession) -> None:
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            pid_box.append(pid)
            inside.set()
            await increment(session)
            await frozen.wait()
            await session.execute(text("SELECT 1"))  # never answered

        handle = ser.submit(write, key="k", timeout=0.5)
        nxt = ser.submit(increment, key="k", timeout=10)
        await asyncio.wait_for(inside.wait(), 10)
        os.kill(pid_box[0], signal.SIGSTOP)
        try:
            began = time.monotonic()
            frozen.set()
            async with asyncio.timeout(10):
                exc = await quietly(handle)
            took = time.monotonic() - began
            assert isinstance(exc, TurnTimeout), repr(exc)
            assert handle.outcome is Outcome.ROLLED_BACK
            assert 0.5 <= took < 0.5 + 0.05 + 0.5 + 1.0, took
            assert ser.stats().connections_invalidated == 1
        finally:
            # Thawed, the backend finds its socket closed and rolls back, which
            # releases the row lock the next write waits for.
            os.kill(pid_box[0], signal.SIGCONT)
        async with asyncio.timeout(10):
            assert await nxt == 1  # the frozen write's increment never landed
        assert await counter(ser.engine) == 1
