"""One small storm, run in every cell of the configuration matrix, and its checks.

A cell is one combination of options (database, coordination, group commit, isolation
level, journal). Its storm: a few writer tasks on two keys submit read-modify-write
appends (read the key's highest ``seq`` from the ledger, insert ``seq + 1``) and stop
some of them at random moments; on Postgres a killer also terminates a few of the
serializers' sessions. Afterwards the database is compared with every handle: a seq
repeated or skipped is a lost update, whether it came from a broken exclusion or from
a snapshot taken before the previous write committed.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from writeturn import Outcome, WriteHandle, WriteSerializer, WriteturnError, migrations

from ._db import loop_reports, pg_leftovers

KEYS = ("a", "b")
WRITERS = 6
WRITES_PER_WRITER = 7  # 42 writes per cell
KILLS = 3  # backend kills per Postgres cell
STORM_DEADLINE = 60.0  # seconds: a cell that takes longer is stuck, not slow

DATABASES = ("sqlite-normal", "sqlite-full", "postgres", "pgbouncer")
ISOLATION_LEVELS = ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
SNAPSHOT_LEVELS = ("REPEATABLE READ", "SERIALIZABLE")

# How a write is stopped, and how often (out of 10).
PLANS = ("none", "queued", "running", "commit", "task", "timeout")
PLAN_WEIGHTS = (5, 1, 1, 1, 1, 1)

# Writes inside their function right now, per key, counted in this process. On SQLite
# this is the exclusion probe across serializers (one writer per database file). On
# Postgres it is counted per serializer only: a killed session's function may still run
# in Python after the server released its lock, and another process may rightly go
# ahead then; the NOWAIT row lock is the probe across serializers there.
INSIDE: Counter[tuple[str, int]] = Counter()


@dataclass(frozen=True)
class Cell:
    database: str
    coordination: str
    batch_max: int
    isolation: str | None
    journal: bool

    @property
    def id(self) -> str:
        parts = [self.database, self.coordination, f"batch{self.batch_max}"]
        if self.isolation is not None:
            parts.append(self.isolation.lower().replace(" ", "_"))
        parts.append("journal" if self.journal else "plain")
        return "-".join(parts)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def postgres(self) -> bool:
        return self.database in ("postgres", "pgbouncer")

    @property
    def refused(self) -> bool:
        """Advisory locks through a transaction pooler cannot give a snapshot taken after
        the lock, so such a serializer must refuse to start instead of losing updates."""
        return (
            self.database == "pgbouncer"
            and self.coordination == "advisory"
            and self.isolation in SNAPSHOT_LEVELS
        )

    @property
    def serializers(self) -> int:
        """Advisory mode is for several processes: two serializers stand for two."""
        return 2 if self.coordination == "advisory" else 1

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "coordination": self.coordination,
            "batch_max": self.batch_max,
            "batch_window": 0.002 if self.batch_max > 1 else 0.0,
            "retries": 2,
            "retry_backoff": 0.002,
            "journal": self.journal,
        }
        if self.database.startswith("sqlite"):
            options["sqlite_synchronous"] = self.database.split("-")[1].upper()
        else:
            options["isolation_level"] = self.isolation
        if self.database == "pgbouncer":
            options["pgbouncer"] = True
        return options


def all_cells() -> list[Cell]:
    cells = []
    for database in DATABASES:
        levels: tuple[str | None, ...] = (
            ISOLATION_LEVELS if database in ("postgres", "pgbouncer") else (None,)
        )
        for coordination in ("turn", "advisory"):
            for batch_max in (1, 16):
                for isolation in levels:
                    for journal in (False, True):
                        cells.append(Cell(database, coordination, batch_max, isolation, journal))
    return cells


async def create_tables(engine: AsyncEngine) -> None:
    """The ledger (no unique constraint on (key, seq): a repeat must show, not fail) and
    one probe row per key, which writes lock but never change."""
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    if engine.dialect.name == "postgresql":
        serial = "BIGSERIAL PRIMARY KEY"
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            f"CREATE TABLE ledger (id {serial}, key TEXT NOT NULL, wid TEXT NOT NULL, "
            "seq INTEGER NOT NULL)"
        )
        await conn.exec_driver_sql("CREATE TABLE probe (key TEXT PRIMARY KEY)")
        for key in KEYS:
            await conn.execute(text("INSERT INTO probe VALUES (:k)"), {"k": key})


def _lock_refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "sqlstate", None) == "55P03" or "could not obtain lock" in str(seen):
            return True
        seen = seen.__cause__ or getattr(seen, "orig", None)
    return False


@dataclass
class Kill:
    state: str | None
    query: str

    @property
    def may_cut_commit(self) -> bool:
        """A COMMIT in flight, just answered, or possibly on the wire (the session was
        idle in its transaction: the client may have sent COMMIT already)."""
        return self.query.lstrip().upper().startswith("COMMIT") or (
            self.state == "idle in transaction"
        )


@dataclass
class Storm:
    cell: Cell
    sers: list[WriteSerializer]
    rnd: random.Random
    handles: dict[str, WriteHandle[Any]] = field(default_factory=dict)
    meta: dict[str, tuple[str, str]] = field(default_factory=dict)  # wid: (key, plan)
    overlaps: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)

    async def append(self, session: AsyncSession, key: str, wid: str, ser: int) -> int:
        """One read-modify-write append on ``key``, probing that it is alone there."""
        inside = (key, ser if self.cell.postgres else 0)
        INSIDE[inside] += 1
        try:
            if INSIDE[inside] > 1:
                self.overlaps.append(f"{wid} entered {key} with {INSIDE[inside] - 1} inside")
            plan = self.meta[wid][1]
            loop = asyncio.get_running_loop()
            handle = self.handles.get(wid)
            if plan == "running" and handle is not None:
                loop.call_later(self.rnd.uniform(0, 0.004), handle.cancel)
            if self.cell.postgres:
                try:
                    await session.execute(
                        text("SELECT key FROM probe WHERE key = :k FOR UPDATE NOWAIT"), {"k": key}
                    )
                except DBAPIError as exc:
                    if _lock_refused(exc):
                        self.overlaps.append(f"{wid} found {key}'s probe row locked")
                    raise
            seq = (
                await session.execute(
                    text("SELECT COALESCE(MAX(seq), 0) FROM ledger WHERE key = :k"), {"k": key}
                )
            ).scalar_one()
            await asyncio.sleep(self.rnd.choice((0, 0, 0.001)))
            await session.execute(
                text("INSERT INTO ledger (key, wid, seq) VALUES (:k, :w, :s)"),
                {"k": key, "w": wid, "s": int(seq) + 1},
            )
            if plan == "commit" and handle is not None:
                # Lands as the function returns: on the flush, the COMMIT, or the
                # batch's wait for it.
                loop.call_soon(handle.cancel)
            return int(seq) + 1
        finally:
            INSIDE[inside] -= 1

    async def writer(self, w: int) -> None:
        ser_index = w % len(self.sers)
        ser = self.sers[ser_index]
        for i in range(WRITES_PER_WRITER):
            wid = f"w{w}:{i}"
            key = self.rnd.choice(KEYS)
            plan = self.rnd.choices(PLANS, weights=PLAN_WEIGHTS)[0]
            self.meta[wid] = (key, plan)
            timeout = self.rnd.uniform(0.002, 0.03) if plan == "timeout" else None
            idem = f"{self.cell.id}:{wid}" if self.cell.journal else None
            handle = ser.submit(
                self.append,
                key,
                wid,
                ser_index,
                key=key,
                writer=f"w{w}",
                timeout=timeout,
                idempotency_key=idem,
            )
            self.handles[wid] = handle
            loop = asyncio.get_running_loop()
            if plan == "queued":
                loop.call_later(self.rnd.uniform(0, 0.002), handle.cancel)
            waiter = asyncio.ensure_future(_settle(handle))
            self.waiters.append(waiter)
            if plan == "task":
                loop.call_later(self.rnd.uniform(0, 0.02), waiter.cancel)
            if self.rnd.random() < 0.5:
                await asyncio.sleep(self.rnd.uniform(0, 0.01))

    async def killer(self, direct_url: str, done: asyncio.Event) -> None:
        """Terminate a few of the serializers' sessions (in a transaction where one is)
        from a connection of its own, at random moments of the storm."""
        from sqlalchemy.engine import make_url

        u = make_url(direct_url)
        conn = await asyncpg.connect(
            host=u.host, port=u.port or 5432, user=u.username, password=u.password,
            database=u.database,
        )  # fmt: skip
        try:
            for _ in range(KILLS):
                await asyncio.sleep(self.rnd.uniform(0.01, 0.15))
                if done.is_set():
                    return
                rows = await conn.fetch(
                    "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                )
                busy = [r["pid"] for r in rows if r["state"] in ("active", "idle in transaction")]
                pool = busy or [r["pid"] for r in rows]
                if not pool:
                    continue
                row = await conn.fetchrow(
                    "SELECT state, query, pg_terminate_backend(pid) AS killed "
                    "FROM pg_stat_activity WHERE pid = $1",
                    self.rnd.choice(sorted(pool)),
                )
                if row is not None and row["killed"]:
                    self.kills.append(Kill(row["state"], row["query"] or ""))
        finally:
            await conn.close()


async def _settle(handle: WriteHandle[Any]) -> None:
    try:
        await handle
    except (asyncio.CancelledError, TimeoutError, WriteturnError, DBAPIError):
        pass


async def run_cell(cell: Cell, url: str, direct_url: str) -> None:
    """Run ``cell``'s storm on ``url`` (``direct_url``: the same database, not pooled) and
    check the database against every handle."""
    INSIDE.clear()
    rnd = random.Random(cell.seed)
    direct = _engine(direct_url)
    try:
        # What asyncio reports (an error nobody retrieved) is collected to the end.
        with loop_reports() as reported:
            await prepare(cell, direct_url)
            sers = [
                WriteSerializer.from_url(url, **cell.options()) for _ in range(cell.serializers)
            ]
            storm = Storm(cell, sers, rnd)
            try:
                async with asyncio.timeout(STORM_DEADLINE):
                    for ser in sers:
                        await ser.start()
                    done = asyncio.Event()
                    killer = (
                        asyncio.ensure_future(storm.killer(direct_url, done))
                        if cell.postgres
                        else None
                    )
                    await asyncio.gather(*(storm.writer(w) for w in range(WRITERS)))
                    await asyncio.gather(*storm.waiters, return_exceptions=True)
                    done.set()
                    if killer is not None:
                        await killer
                    # Nothing may be left behind by the storm, before anyone closes.
                    leftovers = await pg_leftovers(direct)
                    stats = [ser.stats() for ser in sers]
            finally:
                for ser in sers:
                    await ser.close()
            await check(cell, storm, direct, leftovers, stats)
        assert reported == [], reported
    finally:
        await direct.dispose()


async def prepare(cell: Cell, direct_url: str) -> None:
    """The cell's tables, and the journal's where the cell uses it."""
    if cell.journal:
        await migrations.upgrade_async(direct_url)
    engine = _engine(direct_url)
    try:
        await create_tables(engine)
    finally:
        await engine.dispose()


def _engine(url: str) -> AsyncEngine:
    return create_async_engine(url, poolclass=NullPool)


async def check(
    cell: Cell, storm: Storm, direct: AsyncEngine, leftovers: tuple[int, int], stats: list[Any]
) -> None:
    handles = storm.handles
    assert len(handles) == WRITERS * WRITES_PER_WRITER
    assert all(h.done() for h in handles.values())
    outcomes = {wid: h.outcome for wid, h in handles.items()}
    tally = Counter(o.name if o is not None else "None" for o in outcomes.values())
    at_commit = sum(k.may_cut_commit for k in storm.kills)
    print(
        f"\n{cell.id}: {dict(sorted(tally.items()))}, kills {len(storm.kills)} "
        f"(may have cut a COMMIT: {at_commit})"
    )
    assert None not in outcomes.values(), tally

    # Exclusion, as the writes themselves saw it.
    assert storm.overlaps == [], storm.overlaps

    async with direct.connect() as conn:
        rows = [
            tuple(r)
            for r in await conn.execute(text("SELECT key, wid, seq FROM ledger ORDER BY id"))
        ]
        journal = (
            [
                tuple(r)
                for r in await conn.execute(
                    text("SELECT key, seq, idempotency_key FROM writeturn_journal")
                )
            ]
            if cell.journal
            else []
        )
        await conn.rollback()

    # No lost update: each key's seqs are exactly 1..n.
    for key in KEYS:
        seqs = sorted(r[2] for r in rows if r[0] == key)
        repeated = sorted(s for s, n in Counter(seqs).items() if n > 1)
        assert seqs == list(range(1, len(seqs) + 1)), (
            f"key {key}: seqs repeated {repeated}, {len(seqs)} rows, max {max(seqs, default=0)}"
        )

    # Outcome truth: COMMITTED writes are in the database once, ROLLED_BACK and
    # WITHDRAWN ones are not; UNKNOWN only where a kill may have cut a COMMIT.
    per_wid = Counter(r[1] for r in rows)
    assert all(n == 1 for n in per_wid.values()), [w for w, n in per_wid.items() if n > 1]
    for wid, outcome in outcomes.items():
        if outcome is Outcome.COMMITTED:
            assert per_wid[wid] == 1, f"{wid} is COMMITTED ({storm.meta[wid]}) but has no row"
        elif outcome in (Outcome.ROLLED_BACK, Outcome.WITHDRAWN):
            assert per_wid[wid] == 0, f"{wid} is {outcome.name} ({storm.meta[wid]}) but has a row"
    unknown = tally.get("UNKNOWN", 0)
    assert unknown <= at_commit * cell.batch_max, (
        f"{unknown} UNKNOWN with {at_commit} kills that may have cut a COMMIT"
    )
    assert tally.get("COMMITTED", 0) > 0, tally

    if cell.journal:
        # Exactly one journal row per committed idempotency key, none for the others,
        # and the journal's own seqs are gap-free per key.
        idem = Counter(r[2] for r in journal)
        assert all(n == 1 for n in idem.values()), idem
        for wid, outcome in outcomes.items():
            n = idem[f"{cell.id}:{wid}"]
            if outcome is Outcome.COMMITTED:
                assert n == 1, f"{wid} is COMMITTED but has {n} journal rows"
                assert handles[wid].seq is not None
            elif outcome in (Outcome.ROLLED_BACK, Outcome.WITHDRAWN):
                assert n == 0, f"{wid} is {outcome.name} but has a journal row"
        for key in KEYS:
            seqs = sorted(r[1] for r in journal if r[0] == key)
            assert seqs == list(range(1, len(seqs) + 1)), f"journal {key}: {seqs}"

    # The serializers agree, and nothing was left behind.
    assert sum(s.committed for s in stats) == tally.get("COMMITTED", 0)
    assert all((s.queued, s.running) == (0, 0) for s in stats)
    assert leftovers == (0, 0), f"(advisory locks, idle in transaction) left: {leftovers}"
