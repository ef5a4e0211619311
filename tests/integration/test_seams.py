"""Where a write passes between modules: each guarantee must hold at every seam.

One section per item of the issue "One write, one state machine". Each test
states the behaviour the README promises; a probe inside every write function
records who is inside a key, and a second writer inside the same key is a
failure. Every test is bounded (a hang fails fast, with what was seen so far),
collects what it observed and fails with the whole list of broken promises.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite
import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from writeturn import (
    ConfigurationError,
    Outcome,
    WriteHandle,
    WriteSerializer,
    WriteturnError,
)

from ._db import create_tables, ledger, pg_leftovers, record

COORDINATIONS = ["turn", "advisory"]
BOUND = 30.0  # seconds: the outer bound of every test
STEP = 5.0  # seconds: the bound of one step that must not hang
# A transient failure from Postgres itself: SQLSTATE 40001 (serialization_failure).
TRANSIENT = "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"


# -- helpers -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _leaks_surface_in_their_own_test() -> Iterator[None]:
    """A connection a broken close() leaks is collected here, so that its
    ResourceWarning fails the test that leaked it rather than the next one."""
    yield
    gc.collect()


class Checks:
    """Collects every broken promise of a test, so that one failure lists them all."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    def verify(self) -> None:
        assert not self.problems, "broken promises:\n- " + "\n- ".join(self.problems)


class Probe:
    """Who is inside a write function on each key; two at once is a violation."""

    def __init__(self) -> None:
        self.inside: dict[str, list[str]] = defaultdict(list)
        self.overlaps: list[str] = []

    def enter(self, key: str, who: str) -> None:
        if self.inside[key]:
            self.overlaps.append(f"{who} ran while {sorted(self.inside[key])} inside key {key!r}")
        self.inside[key].append(who)

    def leave(self, key: str, who: str) -> None:
        self.inside[key].remove(who)


class Holder:
    """A write that holds its key, inside the probe, until released."""

    def __init__(self, ser: WriteSerializer, probe: Probe, who: str = "A", key: str = "k") -> None:
        self.key, self.who, self.probe = key, who, probe
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.handle: WriteHandle[None] = ser.submit(self._hold, key=key, writer=who)

    async def _hold(self, session: AsyncSession) -> None:
        self.probe.enter(self.key, self.who)
        try:
            await record(session, self.key, self.who, 0)
            self.started.set()
            await self.gate.wait()
        finally:
            self.probe.leave(self.key, self.who)

    async def wait_started(self) -> None:
        await asyncio.wait_for(self.started.wait(), STEP)


async def probed(
    session: AsyncSession, probe: Probe, key: str, who: str, seq: int, pause: float = 0.1
) -> None:
    """A write that records a ledger row and stays inside the probe for ``pause`` seconds."""
    probe.enter(key, who)
    try:
        await record(session, key, who, seq)
        await asyncio.sleep(pause)
    finally:
        probe.leave(key, who)


@asynccontextmanager
async def open_serializer(url: str, **options: Any) -> AsyncIterator[WriteSerializer]:
    """A started serializer; closed at the end within a bound, its engine disposed in any case."""
    ser = WriteSerializer.from_url(url, **options)
    await ser.start()
    try:
        yield ser
    finally:
        try:
            await asyncio.wait_for(ser.close(drain=False), STEP)
        except Exception:
            pass  # the test reports a close that hangs; here it must not hide that report
        await ser.engine.dispose()


async def until(condition: Callable[[], bool], bound: float = STEP) -> bool:
    """Poll ``condition`` until it holds (True) or ``bound`` seconds pass (False)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    while not condition():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.005)
    return True


async def settle_time(h: WriteHandle[Any], bound: float = STEP) -> float | None:
    """Seconds until ``h`` settles, polled from now; None if it did not within ``bound``."""
    t0 = time.monotonic()
    if await until(h.done, bound):
        return time.monotonic() - t0
    return None


def fate(h: WriteHandle[Any]) -> str:
    """A handle's outcome and what ended it, e.g. "ROLLED_BACK TurnTimeout"."""
    if not h.done():
        return f"not settled (outcome {h.outcome.name})"
    exc = h.exception()
    return h.outcome.name + ("" if exc is None else f" {type(exc).__name__}")


def task_end(task: asyncio.Task[Any]) -> str:
    if not task.done():
        return "still running"
    if task.cancelled():
        return "CancelledError"
    exc = task.exception()
    return "returned" if exc is None else f"{type(exc).__name__}: {exc}"


async def close_within(ser: WriteSerializer, bound: float = STEP, **options: Any) -> str:
    try:
        await asyncio.wait_for(ser.close(**options), bound)
    except TimeoutError:
        return f"hung for {bound}s"
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    return "returned"


def refusal(exc: BaseException | None, *keywords: str) -> str:
    """How a misuse was met: "refused" (a WriteturnError whose message names one of
    ``keywords``), "accepted" (no error), or the error that was raised instead."""
    if exc is None:
        return "accepted"
    msg = str(exc).lower()
    if isinstance(exc, WriteturnError) and any(k.lower() in msg for k in keywords):
        return "refused"
    return f"{type(exc).__name__}: {exc}"


class Commits:
    """Counts COMMITs sent on an engine."""

    def __init__(self, engine: Any) -> None:
        self.count = 0
        event.listen(engine.sync_engine, "commit", self._on_commit)

    def _on_commit(self, conn: Any) -> None:
        self.count += 1


async def other_backends(pg_url: str) -> list[str]:
    """Connections to this Postgres database other than the one asking."""
    engine = create_async_engine(pg_url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT pid, coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            found = [f"pid {r[0]} {r[1]}: {r[2][:60]}" for r in rows]
            await conn.rollback()
    finally:
        await engine.dispose()
    return found


def open_driver_connections() -> dict[int, Any]:
    """The aiosqlite and asyncpg connections open in this process now, by id."""
    found: dict[int, Any] = {}
    for obj in gc.get_objects():
        if isinstance(obj, aiosqlite.Connection) and obj._connection is not None:
            found[id(obj)] = obj
        elif isinstance(obj, asyncpg.Connection) and not obj.is_closed():
            found[id(obj)] = obj
    return found


async def close_leaked(known: dict[int, Any]) -> list[str]:
    """Close the driver connections opened since ``known`` was taken and still open; name
    them. A leak then fails its own test, not whichever test the garbage collector
    happens to run in."""
    leaked = [c for i, c in open_driver_connections().items() if i not in known]
    for conn in leaked:
        if isinstance(conn, aiosqlite.Connection):
            await conn.close()
        else:
            conn.terminate()
    return [type(c).__module__.split(".")[0] + " connection" for c in leaked]


# -- 1. a queued transaction() that is stopped keeps the key with its holder ----------


@pytest.mark.parametrize("coordination", COORDINATIONS)
@pytest.mark.parametrize("stop", ["timeout", "cancel"])
async def test_a_stopped_queued_transaction_leaves_the_turn_with_its_holder(
    db_url: str, coordination: str, stop: str
) -> None:
    check = Checks()
    async with asyncio.timeout(BOUND), open_serializer(db_url, coordination=coordination) as ser:
        await create_tables(ser.engine)
        probe = Probe()
        a = Holder(ser, probe, "A")
        await a.wait_started()
        ctx = ser.transaction(key="k", writer="T", timeout=0.2 if stop == "timeout" else None)

        async def block() -> None:
            async with ctx as session:
                probe.enter("k", "T")
                try:
                    await record(session, "k", "T", 1)
                finally:
                    probe.leave("k", "T")

        task = asyncio.create_task(block())
        check(await until(lambda: "T" in ser.key_statistics("k").writers), "T never queued")
        if stop == "cancel":
            ctx.handle.cancel()
        await asyncio.wait({task}, timeout=STEP)
        want = "TurnTimeout" if stop == "timeout" else "CancelledError"
        check(task_end(task).startswith(want), f"the block ended with {task_end(task)}, not {want}")
        check(fate(ctx.handle).startswith("WITHDRAWN"), f"T ended {fate(ctx.handle)}")
        # The key is still A's: C must wait until A's write has ended.
        c = ser.submit(probed, probe, "k", "C", 2, key="k", writer="C")
        await asyncio.sleep(0.3)
        check(not c.done() and "C" not in probe.inside["k"], "C ran while A holds the key")
        a.gate.set()
        await until(lambda: a.handle.done() and c.done())
        check(fate(a.handle) == "COMMITTED", f"A ended {fate(a.handle)}")
        check(fate(c) == "COMMITTED", f"C ended {fate(c)}")
        check(probe.overlaps == [], f"mutual exclusion broken: {probe.overlaps}")
        rows = [r[2] for r in await ledger(ser.engine)]
        check(rows == ["A", "C"], f"ledger rows by writer: {rows}, expected ['A', 'C']")
        check(await pg_leftovers(ser.engine) == (0, 0), "advisory locks or idle sessions left")
        closed = await close_within(ser)
        check(closed == "returned", f"close() {closed}")
    check.verify()


@pytest.mark.parametrize("coordination", COORDINATIONS)
async def test_close_without_drain_while_a_transaction_is_queued(
    db_url: str, coordination: str
) -> None:
    check = Checks()
    async with asyncio.timeout(BOUND), open_serializer(db_url, coordination=coordination) as ser:
        await create_tables(ser.engine)
        probe = Probe()
        a = Holder(ser, probe, "A")
        await a.wait_started()
        ctx = ser.transaction(key="k", writer="T")

        async def block() -> None:
            async with ctx as session:
                probe.enter("k", "T")
                try:
                    await record(session, "k", "T", 1)
                finally:
                    probe.leave("k", "T")

        task = asyncio.create_task(block())
        check(await until(lambda: "T" in ser.key_statistics("k").writers), "T never queued")
        closed = await close_within(ser, drain=False)
        check(closed == "returned", f"close(drain=False) {closed}")
        await asyncio.wait({task}, timeout=STEP)
        end = task_end(task)
        check(end.startswith("SerializerClosed"), f"the block ended with {end}")
        check(fate(ctx.handle) == "WITHDRAWN SerializerClosed", f"T ended {fate(ctx.handle)}")
        await until(a.handle.done)
        check(fate(a.handle) == "ROLLED_BACK SerializerClosed", f"A ended {fate(a.handle)}")
        check(probe.overlaps == [], f"mutual exclusion broken: {probe.overlaps}")
        rows = await ledger(ser.engine)
        check(rows == [], f"rows of stopped writes landed: {rows}")
        check(await pg_leftovers(ser.engine) == (0, 0), "advisory locks or idle sessions left")
    check.verify()


# -- 2. fn raising a BaseException that is not an Exception ----------------------------


class Fatal(BaseException):
    """A BaseException that is not an Exception (like KeyboardInterrupt's kin)."""


@pytest.mark.parametrize("coordination", COORDINATIONS)
@pytest.mark.parametrize("kind", [Fatal, GeneratorExit])
async def test_fn_raising_a_base_exception_passes_the_turn_once(
    db_url: str, coordination: str, kind: type[BaseException]
) -> None:
    check = Checks()
    async with asyncio.timeout(BOUND), open_serializer(db_url, coordination=coordination) as ser:
        await create_tables(ser.engine)
        probe = Probe()
        started, gate = asyncio.Event(), asyncio.Event()

        async def fatal(session: AsyncSession) -> None:
            probe.enter("k", "A")
            try:
                await record(session, "k", "A", 0)
                started.set()
                await gate.wait()
            finally:
                probe.leave("k", "A")
            raise kind("not an Exception")

        a = ser.submit(fatal, key="k", writer="A")
        await asyncio.wait_for(started.wait(), STEP)
        b = ser.submit(probed, probe, "k", "B", 1, 0.3, key="k", writer="B")
        c = ser.submit(probed, probe, "k", "C", 2, 0.3, key="k", writer="C")
        gate.set()
        await until(lambda: all(h.done() for h in (a, b, c)))
        check(fate(a) == f"ROLLED_BACK {kind.__name__}", f"A ended {fate(a)}")
        check(fate(b) == "COMMITTED", f"B ended {fate(b)}")
        check(fate(c) == "COMMITTED", f"C ended {fate(c)}")
        check(probe.overlaps == [], f"mutual exclusion broken: {probe.overlaps}")
        rows = [r[2] for r in await ledger(ser.engine)]
        check(rows == ["B", "C"], f"ledger rows by writer: {rows}, expected ['B', 'C']")
        closed = await close_within(ser)
        check(closed == "returned", f"close() {closed}")
    check.verify()


# -- 3. a statement error swallowed inside fn ------------------------------------------


async def _dup_table(ser: WriteSerializer) -> None:
    await create_tables(ser.engine)
    async with ser.engine.begin() as conn:
        await conn.exec_driver_sql("CREATE TABLE uniq (k TEXT PRIMARY KEY)")
        await conn.exec_driver_sql("INSERT INTO uniq VALUES ('dup')")


async def _insert_or_ignore(session: AsyncSession) -> str:
    """The usual "insert or ignore" habit, without a savepoint."""
    await record(session, "k", "w", 1)
    try:
        await session.execute(text("INSERT INTO uniq VALUES ('dup')"))
    except IntegrityError:
        pass
    return "ok"


def _expect_swallowed(check: Checks, ser: WriteSerializer, h: WriteHandle[Any], rows: Any) -> None:
    if ser.engine.dialect.name == "postgresql":
        # The failed statement aborted the transaction: COMMIT rolls back.
        check(h.outcome is Outcome.ROLLED_BACK, f"outcome {fate(h)}, though nothing landed")
        exc = h.exception() if h.done() else None
        check(
            refusal(exc, "begin_nested") == "refused",
            f"the write ended with {refusal(exc, 'begin_nested')}, not a WriteturnError "
            "pointing to session.begin_nested()",
        )
        check(rows == [], f"rows landed: {rows}")
    else:
        # SQLite keeps the transaction after a failed statement: the rest commits.
        check(fate(h) == "COMMITTED", f"outcome {fate(h)}")
        check(len(rows) == 1, f"rows: {rows}")


async def test_a_swallowed_statement_error_is_not_reported_committed(db_url: str) -> None:
    check = Checks()
    async with asyncio.timeout(BOUND), open_serializer(db_url) as ser:
        await _dup_table(ser)
        h = ser.submit(_insert_or_ignore, key="k")
        await settle_time(h)
        _expect_swallowed(check, ser, h, await ledger(ser.engine))
    check.verify()


async def test_a_swallowed_statement_error_in_a_transaction_block(db_url: str) -> None:
    check = Checks()
    async with asyncio.timeout(BOUND), open_serializer(db_url) as ser:
        await _dup_table(ser)
        ctx = ser.transaction(key="k")
        try:
            async with ctx as session:
                await _insert_or_ignore(session)
        except WriteturnError:
            pass  # checked through the handle below
        _expect_swallowed(check, ser, ctx.handle, await ledger(ser.engine))
    check.verify()


# -- 4. misuse that voids the guarantees -------------------------------------------------


@pytest.mark.parametrize("how", ["connection.commit()", "text('COMMIT')"])
async def test_fn_committing_by_itself_is_refused(db_url: str, how: str) -> None:
    check = Checks()
    async with asyncio.timeout(BOUND), open_serializer(db_url) as ser:
        await create_tables(ser.engine)
        seen: list[BaseException | None] = []

        async def sneaky(session: AsyncSession) -> None:
            await record(session, "k", "w", 1)
            try:
                if how == "connection.commit()":
                    await (await session.connection()).commit()
                else:
                    await session.execute(text("COMMIT"))
            except Exception as exc:
                seen.append(exc)
                raise
            seen.append(None)
            raise LookupError("fn fails after its own commit")

        h = ser.submit(sneaky, key="k")
        await settle_time(h)
        attempt = refusal(seen[0] if seen else None, "commit")
        check(attempt == "refused", f"{how} inside fn: {attempt}, not a WriteturnError")
        check(h.outcome is Outcome.ROLLED_BACK, f"the write ended {fate(h)}")
        rows = await ledger(ser.engine)
        check(rows == [], f"rows of a {h.outcome.name} write are in the database: {rows}")
        nxt = ser.submit(record, "k", "next", 2, key="k")
        await settle_time(nxt)
        check(fate(nxt) == "COMMITTED", f"the next write ended {fate(nxt)}")
    check.verify()


async def test_an_autocommit_engine_is_refused_or_made_harmless(db_url: str) -> None:
    """An AUTOCOMMIT engine would commit each statement of a write at once: writeturn must
    refuse it (ConfigurationError naming autocommit) or make it impossible (a write that
    rolls back leaves nothing). SQLite's explicit BEGIN IMMEDIATE already does the latter."""
    engine = create_async_engine(db_url, isolation_level="AUTOCOMMIT")
    try:
        await create_tables(engine)

        async def fails(session: AsyncSession) -> None:
            await record(session, "k", "w", 1)
            raise LookupError("roll me back")

        async with asyncio.timeout(BOUND):
            try:
                async with WriteSerializer(engine) as ser:
                    h = ser.submit(fails, key="k")
                    await settle_time(h)
                    rows = await ledger(engine)
            except ConfigurationError as exc:
                assert "autocommit" in str(exc).lower(), exc
                return
        assert rows == [], (
            f"WriteSerializer accepted an AUTOCOMMIT engine, and a write that ended {fate(h)} "
            f"left its rows: {rows}"
        )
    finally:
        await engine.dispose()


async def test_a_task_spawned_by_fn_cannot_use_the_session_after_the_write(db_url: str) -> None:
    check = Checks()
    async with asyncio.timeout(BOUND), open_serializer(db_url) as ser:
        await create_tables(ser.engine, "a", "b")
        go, stray_done = asyncio.Event(), asyncio.Event()
        stray_end: list[BaseException | None] = []
        strays: list[asyncio.Task[None]] = []

        async def spawner(session: AsyncSession) -> None:
            await record(session, "a", "A", 1)

            async def stray() -> None:
                await go.wait()
                try:
                    await record(session, "a", "stray", 2)
                    stray_end.append(None)
                except Exception as exc:
                    stray_end.append(exc)
                finally:
                    stray_done.set()

            strays.append(asyncio.create_task(stray()))

        a = ser.submit(spawner, key="a", writer="A")
        await settle_time(a)

        async def other_key(session: AsyncSession) -> None:
            await record(session, "b", "B", 3)
            go.set()  # the stray task uses A's session while B's transaction is open
            await asyncio.wait_for(stray_done.wait(), STEP)

        b = ser.submit(other_key, key="b", writer="B")
        await settle_time(b)
        await asyncio.wait(strays, timeout=STEP)
        attempt = refusal(stray_end[0] if stray_end else None, "session", "ended", "write")
        check(attempt == "refused", f"the stray statement after A ended: {attempt}")
        check(fate(a) == "COMMITTED", f"A ended {fate(a)}")
        check(fate(b) == "COMMITTED", f"B ended {fate(b)}")
        rows = [(r[1], r[2]) for r in await ledger(ser.engine)]
        check(rows == [("a", "A"), ("b", "B")], f"ledger rows: {rows}")
    check.verify()


# -- 5. the retry back-off hears every stop ------------------------------------------------

BACKOFF = 2.0  # retry_backoff: the first back-off lasts 0.5 to 1.5 times this


class Flaky:
    """A write function that fails transiently (40001 from Postgres) on its first call."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, session: AsyncSession) -> None:
        self.calls += 1
        await record(session, "k", "w", self.calls)
        if self.calls == 1:
            await session.execute(text(TRANSIENT))


async def ran_once_and_never_committed(
    check: Checks, fn: Flaky, commits: Commits, ser: WriteSerializer
) -> None:
    """A write stopped during its back-off: fn ran once, nothing was committed or landed."""
    check(fn.calls == 1, f"fn ran {fn.calls} times")
    check(commits.count == 0, f"{commits.count} COMMIT sent")
    check(await ledger(ser.engine) == [], "rows landed")


@pytest.mark.postgres
async def test_cancel_during_the_retry_back_off_settles_at_once(pg_url: str) -> None:
    check = Checks()
    async with (
        asyncio.timeout(BOUND),
        open_serializer(pg_url, retries=3, retry_backoff=BACKOFF) as ser,
    ):
        await create_tables(ser.engine)
        commits = Commits(ser.engine)
        fn = Flaky()
        h = ser.submit(fn, key="k")
        assert await until(lambda: ser.stats().retries == 1), "the first attempt never failed"
        await asyncio.sleep(0.05)  # in the back-off now
        h.cancel()
        took = await settle_time(h, 3 * BACKOFF)
        ratio = None if took is None else took / BACKOFF
        check(ratio is not None and ratio < 0.2, f"cancel settled after {ratio} x retry_backoff")
        check(fate(h) == "ROLLED_BACK CancelledError", f"the write ended {fate(h)}")
        await ran_once_and_never_committed(check, fn, commits, ser)
    check.verify()


@pytest.mark.postgres
async def test_a_timeout_during_the_retry_back_off_ends_the_write(pg_url: str) -> None:
    check = Checks()
    async with (
        asyncio.timeout(BOUND),
        open_serializer(pg_url, retries=3, retry_backoff=BACKOFF) as ser,
    ):
        await create_tables(ser.engine)
        commits = Commits(ser.engine)
        fn = Flaky()
        h = ser.submit(fn, key="k", timeout=0.3)
        took = await settle_time(h, 3 * BACKOFF)
        ratio = None if took is None else took / BACKOFF
        check(ratio is not None and ratio < 0.35, f"timeout=0.3 ended after {ratio} x backoff")
        check(fate(h) == "ROLLED_BACK TurnTimeout", f"the write ended {fate(h)}")
        await ran_once_and_never_committed(check, fn, commits, ser)
    check.verify()


@pytest.mark.postgres
async def test_close_without_drain_during_the_retry_back_off_ends_the_write(pg_url: str) -> None:
    check = Checks()
    async with (
        asyncio.timeout(BOUND),
        open_serializer(pg_url, retries=3, retry_backoff=BACKOFF) as ser,
    ):
        await create_tables(ser.engine)
        commits = Commits(ser.engine)
        fn = Flaky()
        h = ser.submit(fn, key="k")
        assert await until(lambda: ser.stats().retries == 1), "the first attempt never failed"
        await asyncio.sleep(0.05)  # in the back-off now
        t0 = time.monotonic()
        closed = await close_within(ser, 3 * BACKOFF, drain=False)
        ratio = (time.monotonic() - t0) / BACKOFF
        check(closed == "returned", f"close(drain=False) {closed}")
        check(ratio < 0.2, f"close(drain=False) took {ratio:.2f} x retry_backoff")
        await until(h.done)
        check(fate(h) == "ROLLED_BACK SerializerClosed", f"the write ended {fate(h)}")
        await ran_once_and_never_committed(check, fn, commits, ser)
    check.verify()


@pytest.mark.postgres
async def test_a_retry_after_a_transient_failure_at_commit_keeps_the_timeout(pg_url: str) -> None:
    check = Checks()
    hang = 4.0  # the second attempt's function takes this long; the timeout is 1.0
    async with (
        asyncio.timeout(BOUND),
        open_serializer(pg_url, retries=3, retry_backoff=0.01) as ser,
    ):
        await create_tables(ser.engine)
        async with ser.engine.begin() as conn:
            # A deferred constraint trigger: the first attempt fails at COMMIT with 40001.
            await conn.exec_driver_sql("CREATE TABLE attempt (n INTEGER)")
            await conn.exec_driver_sql(
                "CREATE FUNCTION fail_first() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.n = 1 THEN RAISE EXCEPTION 'conflict at commit' USING ERRCODE = '40001'; "
                "END IF; RETURN NEW; END $$"
            )
            await conn.exec_driver_sql(
                "CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON attempt "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_first()"
            )
        calls = 0

        async def write(session: AsyncSession) -> None:
            nonlocal calls
            calls += 1
            await session.execute(text("INSERT INTO attempt VALUES (:n)"), {"n": calls})
            await record(session, "k", "w", calls)
            if calls > 1:
                await asyncio.sleep(hang)

        h = ser.submit(write, key="k", timeout=1.0)
        took = await settle_time(h, 3 * hang)
        ratio = None if took is None else took / hang
        check(ratio is not None and ratio < 0.5, f"timeout=1.0 ended after {ratio} x {hang}s")
        check(calls == 2, f"fn ran {calls} times")
        check(fate(h) == "ROLLED_BACK TurnTimeout", f"the write ended {fate(h)}")
        check(await ledger(ser.engine) == [], "rows landed")
    check.verify()


# -- 6. retries with group commit ----------------------------------------------------------


@pytest.mark.postgres
async def test_group_commit_retries_transient_failures(pg_url: str) -> None:
    check = Checks()
    async with (
        asyncio.timeout(BOUND),
        open_serializer(pg_url, batch_max=8, retries=3, retry_backoff=0.01) as ser,
    ):
        await create_tables(ser.engine)
        attempts: dict[int, int] = defaultdict(int)

        async def write(session: AsyncSession, i: int) -> None:
            attempts[i] += 1
            await record(session, "k", "w", i)
            if attempts[i] == 1:
                await session.execute(text(TRANSIENT))

        holder = Holder(ser, Probe(), "blocker")
        await holder.wait_started()
        handles = [ser.submit(write, i, key="k", writer="w") for i in range(6)]
        holder.gate.set()
        await until(lambda: all(h.done() for h in (holder.handle, *handles)))
        fates = [fate(h) for h in handles]
        check(fates == ["COMMITTED"] * 6, f"the writes ended {fates}")
        check(ser.stats().retries > 0, f"stats().retries == {ser.stats().retries}")
        seqs = sorted(r[3] for r in await ledger(ser.engine) if r[2] == "w")
        check(seqs == list(range(6)), f"rows of the batched writes: {seqs}")
    check.verify()


# -- 7. group commit keeps deadlines -------------------------------------------------------

WINDOW = 1.0  # batch_window


async def test_group_commit_window_does_not_stretch_a_timeout(db_url: str) -> None:
    check = Checks()
    async with (
        asyncio.timeout(BOUND),
        open_serializer(db_url, batch_max=8, batch_window=WINDOW) as ser,
    ):
        await create_tables(ser.engine)
        holder = Holder(ser, Probe(), "blocker")
        await holder.wait_started()
        first = ser.submit(record, "k", "w", 1, key="k", writer="w")
        t0 = time.monotonic()
        late = ser.submit(record, "k", "w", 2, key="k", writer="w", timeout=0.3)
        holder.gate.set()  # first and late now form a batch, which waits for more
        await until(late.done, 3 * WINDOW)
        ratio = (time.monotonic() - t0) / WINDOW
        check(ratio < 0.6, f"timeout=0.3 raised after {ratio:.2f} x batch_window")
        check(
            fate(late) in ("WITHDRAWN TurnTimeout", "ROLLED_BACK TurnTimeout"),
            f"the write ended {fate(late)}",
        )
        await until(first.done, 3 * WINDOW)
        check(fate(first) == "COMMITTED", f"the other write ended {fate(first)}")
        rows = [r[3] for r in await ledger(ser.engine) if r[2] == "w"]
        check(rows == [1], f"rows: {rows}")
    check.verify()


async def test_group_commit_window_does_not_delay_a_cancel(db_url: str) -> None:
    check = Checks()
    async with (
        asyncio.timeout(BOUND),
        open_serializer(db_url, batch_max=8, batch_window=WINDOW) as ser,
    ):
        await create_tables(ser.engine)
        holder = Holder(ser, Probe(), "blocker")
        await holder.wait_started()
        first = ser.submit(record, "k", "w", 1, key="k", writer="w")
        late = ser.submit(record, "k", "w", 2, key="k", writer="w")
        holder.gate.set()
        # Both are claimed by one batch, which waits for more writes to arrive.
        assert await until(lambda: ser.key_statistics("k").waiting == 0 and holder.handle.done())
        await asyncio.sleep(0.05)
        late.cancel()
        took = await settle_time(late, 3 * WINDOW)
        ratio = None if took is None else took / WINDOW
        check(ratio is not None and ratio < 0.3, f"cancel settled after {ratio} x batch_window")
        check(fate(late) == "WITHDRAWN CancelledError", f"the write ended {fate(late)}")
        await until(first.done, 3 * WINDOW)
        check(fate(first) == "COMMITTED", f"the other write ended {fate(first)}")
        rows = [r[3] for r in await ledger(ser.engine) if r[2] == "w"]
        check(rows == [1], f"rows: {rows}")
    check.verify()


# -- 8. close() edge cases -------------------------------------------------------------------


async def test_a_close_cut_short_leaves_the_next_close_waiting(db_url: str) -> None:
    check = Checks()
    known = open_driver_connections()
    async with asyncio.timeout(BOUND):
        async with open_serializer(db_url) as ser:
            await create_tables(ser.engine)
            started = asyncio.Event()

            async def slow(session: AsyncSession) -> None:
                await record(session, "k", "w", 1)
                started.set()
                await asyncio.sleep(0.5)

            h = ser.submit(slow, key="k")
            await asyncio.wait_for(started.wait(), STEP)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ser.close(), 0.05)
            closed = await close_within(ser)
            check(closed == "returned", f"the second close() {closed}")
            check(h.done(), f"the second close() returned with the write {fate(h)}")
            await until(h.done)
            await asyncio.sleep(0.1)  # a connection closed by the pool is gone from the server
            if ser.engine.dialect.name == "postgresql":
                left = await other_backends(db_url)
                check(left == [], f"connections to the database still open: {left}")
        leaked = await close_leaked(known)
        check(leaked == [], f"driver connections left open after close(): {leaked}")
    check.verify()


async def test_close_inside_a_write_function_is_refused(db_url: str) -> None:
    check = Checks()
    known = open_driver_connections()
    async with asyncio.timeout(BOUND):
        async with open_serializer(db_url) as ser:
            await create_tables(ser.engine)
            seen: list[tuple[str, float]] = []

            async def closer(session: AsyncSession) -> None:
                await record(session, "k", "w", 1)
                t0 = time.monotonic()
                try:
                    await asyncio.wait_for(ser.close(), 2.0)
                except Exception as exc:
                    seen.append((refusal(exc, "close"), time.monotonic() - t0))
                else:
                    seen.append(("returned", time.monotonic() - t0))

            h = ser.submit(closer, key="k")
            await settle_time(h)
            what, took = seen[0] if seen else ("never called", 0.0)
            check(what == "refused", f"close() inside a write function: {what}")
            check(took < 0.5, f"close() inside a write function took {took:.2f}s")
            check(fate(h) == "COMMITTED", f"the write ended {fate(h)}")
        leaked = await close_leaked(known)
        check(leaked == [], f"driver connections left open after close(): {leaked}")
    check.verify()
