"""Failover: a real primary and a real streaming standby (tests/integration/_standby.py),
the standby promoted while writeturn writes, the old primary fenced.

1. The transaction-id trap, forced: a COMMIT cut off on the old primary, and the same
   transaction id given to another transaction on the promoted standby.
2. The old primary fenced read-only while the service writes: writes move to the new
   primary, none is lost, the read-only server takes none.
3. A standby listed first, without target_session_attrs: a lost connection, not a raw error.
4. doctor on a standby, and on primaries with asynchronous and synchronous standbys.
5. Storms of several processes switched over mid-way, synchronous and asynchronous
   replication (tests/integration/_failover_worker.py).
Each case that names its servers does so in both multi-host forms: libpq's
(``host1:port1,host2:port2``) and SQLAlchemy's (``?host=...&host=...``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from writeturn import (
    ConnectionLost,
    DatabaseUnreachable,
    Outcome,
    OutcomeUnknown,
    WriteSerializer,
    WriteturnError,
    migrations,
)
from writeturn.tools.doctor import diagnose

from ._proxy import CuttingProxy
from ._standby import ReplicatedPair
from .test_connections import _asyncpg_kwargs

pytestmark = [pytest.mark.postgres, pytest.mark.standby]

MakePair = Callable[..., ReplicatedPair]

LEDGER = (
    "CREATE TABLE ledger (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, "
    "idem TEXT UNIQUE, xid BIGINT, server TEXT)"
)


def both_forms(pair: ReplicatedPair, form: str, database: str = "postgres") -> str:
    return pair.libpq_url(database) if form == "libpq" else pair.host_query_url(database)


async def setup_schema(url: str) -> None:
    """writeturn's tables (its migrations) and the ledger, on the primary."""
    await migrations.upgrade_async(url)
    conn = await asyncpg.connect(**_asyncpg_kwargs(url))
    try:
        await conn.execute(LEDGER)
    finally:
        await conn.close()


async def rows(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(**_asyncpg_kwargs(url))
    try:
        return list(await conn.fetch("SELECT key, idem, xid FROM ledger ORDER BY id"))
    finally:
        await conn.close()


# -- 1. the transaction-id trap ------------------------------------------------------------


async def give_the_same_id(url: str, xid: int) -> None:
    """On the server at ``url``, commit a decoy transaction that is given ``xid``."""
    conn = await asyncpg.connect(**_asyncpg_kwargs(url))
    try:
        for _ in range(100_000):
            async with conn.transaction():
                got = await conn.fetchval("SELECT txid_current()")
                if got == xid:
                    await conn.execute(
                        "INSERT INTO ledger (key, idem, xid, server) VALUES ('k', NULL, $1, "
                        "'decoy')",
                        xid,
                    )
                    return
                assert got < xid, f"the new primary is past {xid} already ({got})"
                # Rolled back: the id is used up all the same.
                raise _Burnt
    except _Burnt:
        pass
    finally:
        await conn.close()
    await give_the_same_id(url, xid)


class _Burnt(Exception):
    pass


@pytest.mark.parametrize("idempotent", [False, True], ids=["no-key", "idempotency-key"])
async def test_a_cut_off_commit_is_not_resolved_by_another_transaction_with_its_id(
    replicated_pair: MakePair, idempotent: bool
) -> None:
    """The standby is promoted after the old primary gave the write its transaction id
    and before that write's WAL reached the standby; the new primary gives the same id
    to a decoy that commits. Asked there, txid_status would say COMMITTED: the write is
    not on the new primary, so it must be ROLLED_BACK (learnt from its journal row) or
    UNKNOWN (no idempotency key), never COMMITTED."""
    pair = replicated_pair(synchronous=False)
    old, new = pair.primary, pair.standby
    await setup_schema(old.url())
    await asyncio.to_thread(pair.wait_caught_up)
    await asyncio.to_thread(pair.pause_replication)  # what the old primary commits is lost

    async with asyncio.timeout(60), CuttingProxy(old.url(), "after") as proxy:
        proxy.refuse_on_cut = True  # the old primary is gone from the service's view
        # The relay first, the standby second: connections find the primary.
        url = (
            f"postgresql+asyncpg://postgres@/postgres?host=127.0.0.1:{proxy.listen_port}"
            f"&host=127.0.0.1:{new.port}&target_session_attrs=read-write"
        )
        xids: list[int] = []

        async def write(session: AsyncSession) -> None:
            xid = (await session.execute(text("SELECT txid_current()"))).scalar_one()
            xids.append(xid)
            await session.execute(
                text("INSERT INTO ledger (key, idem, xid, server) VALUES ('k', :i, :x, 'old')"),
                {"i": "w1" if idempotent else None, "x": xid},
            )
            proxy.armed = True  # cut this write's COMMIT once the old primary answered it

        async with WriteSerializer.from_url(url, coordination="advisory", journal=True) as ser:
            handle = ser.submit(write, key="k", idempotency_key="w1" if idempotent else None)
            await asyncio.wait_for(proxy.was_cut.wait(), 10)
            # The old primary committed the write; the client never heard. Fail over.
            await asyncio.to_thread(old.stop, "immediate")
            await asyncio.to_thread(new.promote)
            assert new.timeline() > 1
            await give_the_same_id(new.url(), xids[0])
            try:
                await handle
            except WriteturnError:
                pass
        on_new = await rows(new.url())
        decoys = [r for r in on_new if r["xid"] == xids[0]]
        assert len(decoys) == 1 and decoys[0]["idem"] is None  # only the decoy has the id
        assert handle.outcome is not Outcome.COMMITTED, "resolved by the decoy's answer"
        if idempotent:
            # Its journal row is not on the new primary: it did not commit there.
            assert handle.outcome is Outcome.ROLLED_BACK
        else:
            assert handle.outcome is Outcome.UNKNOWN
            assert isinstance(handle.exception(), OutcomeUnknown)


# -- 2. the old primary fenced read-only while the service writes -------------------------


@pytest.mark.parametrize("fence_by", ["reload", "restart"])
@pytest.mark.parametrize("form", ["libpq", "host-query"])
async def test_writes_move_to_the_new_primary_when_the_old_one_is_fenced_read_only(
    replicated_pair: MakePair, form: str, fence_by: str
) -> None:
    """The old primary is switched read-only while the service writes, by a reload
    (its sessions stay open, and refuse writes) or a restart (its sessions end, and
    new ones are read-only); 0.2 s later the standby is promoted."""
    pair = replicated_pair(synchronous=True)
    old, new = pair.primary, pair.standby
    await setup_schema(old.url())
    url = both_forms(pair, form)
    outcomes: dict[str, Any] = {}
    errors: list[BaseException] = []
    fenced_at: list[float] = []
    first_after: list[float] = []

    async def write(session: AsyncSession, idem: str) -> None:
        await session.execute(
            text(
                "INSERT INTO ledger (key, idem, xid, server) VALUES "
                "('k', :i, txid_current(), inet_server_port()::text)"
            ),
            {"i": idem},
        )

    async with (
        asyncio.timeout(90),
        WriteSerializer.from_url(url, journal=True, retry_backoff=0.05) as ser,
    ):

        async def writer(w: int) -> None:
            for i in range(60):
                idem = f"w{w}-{i}"
                try:
                    await ser.run(write, idem, key=f"k{w % 3}", idempotency_key=idem, retries=5)
                    outcomes[idem] = Outcome.COMMITTED
                    if fenced_at and not first_after:
                        first_after.append(time.monotonic())
                except WriteturnError as exc:
                    outcomes[idem] = exc
                except Exception as exc:  # a raw driver error: the test fails below
                    errors.append(exc)
                await asyncio.sleep(0.01)

        async def fence() -> None:
            await asyncio.sleep(0.4)
            fenced = old.make_read_only if fence_by == "reload" else old.restart_read_only
            await asyncio.to_thread(fenced)
            fenced_at.append(time.monotonic())
            await asyncio.sleep(0.2)  # writes meet the read-only server
            await asyncio.to_thread(pair.switch_over, "read_only")

        await asyncio.gather(*(writer(w) for w in range(6)), fence())
    assert errors == [], errors[:3]
    committed = {k for k, v in outcomes.items() if v is Outcome.COMMITTED}
    on_new = {r["idem"]: r for r in await rows(new.url())}
    assert committed == set(on_new), (len(committed), len(on_new))
    failed = {k: v for k, v in outcomes.items() if v is not Outcome.COMMITTED}
    assert all(isinstance(v, ConnectionLost | DatabaseUnreachable) for v in failed.values()), failed
    # Nothing went to the fenced server after the fence: every row it has is on the new one.
    on_old = {r["idem"] for r in await rows(old.url())}
    assert on_old <= set(on_new)
    assert first_after, "no write committed after the fence"
    print(
        f"\n[{form}, {fence_by}] fence to first commit on the new primary: "
        f"{first_after[0] - fenced_at[0]:.2f}s, {len(committed)} committed, "
        f"{len(failed)} failed"
    )


# -- 5. storms of several processes, switched over mid-way ---------------------------------

WORKER = Path(__file__).with_name("_failover_worker.py")
PROCESSES, WRITERS, KEYS = 4, 3, 3
STORM_SEED = 20261208


async def storm(
    url: str, tmp: Path, switch: Callable[[], Any], before: float = 1.0, after: float = 2.0
) -> tuple[list[dict[str, Any]], float, float]:
    """Run the worker processes against ``url``; ``switch()`` (in a thread) ``before``
    seconds in. Returns every write's record, when the switch began and when it ended."""
    stop = tmp / "stop"
    outs = [tmp / f"out-{p}.jsonl" for p in range(PROCESSES)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            url,
            str(p),
            str(WRITERS),
            str(KEYS),
            str(STORM_SEED),
            str(stop),
            str(outs[p]),
            env=env,
        )
        for p in range(PROCESSES)
    ]
    try:
        ready = [tmp / f"stop.ready-{p}" for p in range(PROCESSES)]
        for _ in range(600):
            if all(r.exists() for r in ready) or any(p.returncode is not None for p in procs):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(before)
        began = time.time()
        await asyncio.to_thread(switch)
        ended = time.time()
        await asyncio.sleep(after)
        stop.touch()
        codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 120)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
    assert codes == [0] * PROCESSES
    records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    return records, began, ended


async def journal(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(**_asyncpg_kwargs(url))
    try:
        return list(
            await conn.fetch(
                "SELECT key, seq, idempotency_key FROM writeturn_journal ORDER BY key, seq"
            )
        )
    finally:
        await conn.close()


async def check_the_new_primary(url: str, records: list[dict[str, Any]]) -> set[str]:
    """What every storm must leave: no raw error; on the new primary, each write at most
    once, each key's seq 1..n without gap or repeat, a COMMITTED write's seq its own.
    Returns the idempotency keys on the new primary."""
    raw = [r for r in records if not r["ours"]]
    assert raw == [], raw[:3]
    ledger = [r["idem"] for r in await rows(url)]
    assert len(ledger) == len(set(ledger))  # nothing twice
    entries = await journal(url)
    assert sorted(e["idempotency_key"] for e in entries) == sorted(ledger)  # one fate
    for key in {e["key"] for e in entries}:
        seqs = [e["seq"] for e in entries if e["key"] == key]
        assert seqs == list(range(1, len(seqs) + 1)), key
    seq_of = {e["idempotency_key"]: e["seq"] for e in entries}
    for r in records:
        if r["outcome"] == "committed" and r["idem"] in seq_of:
            assert r["seq"] == seq_of[r["idem"]], r
    return set(ledger)


def resumed(records: list[dict[str, Any]], at: float) -> str:
    """How writes went on after the promotion at ``at``: the first commit after it, and
    the longest a write that spanned the switch took."""
    after = [r["t"] for r in records if r["outcome"] == "committed" and r["t"] > at]
    assert after, "no write committed after the switch"
    longest = max(r["t"] - r["t0"] for r in records if r["t0"] <= at <= r["t"])
    return (
        f"first commit {min(after) - at:.2f}s after the promotion, the longest write "
        f"across the switch {longest:.2f}s"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("form", "level", "fence"),
    [
        ("libpq", "remote_apply", "stop"),
        ("host-query", "remote_apply", "crash"),
        ("host-query", "on", "stop"),
        ("libpq", "on", "crash"),
    ],
)
async def test_a_storm_switched_over_with_synchronous_replication_loses_nothing(
    replicated_pair: MakePair, form: str, level: str, fence: str, tmp_path: Path
) -> None:
    """synchronous_commit = remote_apply (the standby has applied each COMMIT) or on
    (the standby has flushed it). "stop": a fast stop of the old primary, then the
    promotion. "crash", as in the asynchronous case: the standby stops receiving, the
    old primary goes on 0.3 s (its COMMITs now wait for the standby), then crashes and
    the standby is promoted: what waited was never acknowledged, and is resolved on
    the new primary."""
    pair = replicated_pair(synchronous=True, synchronous_commit=level)
    await setup_schema(pair.primary.url())

    def crash() -> None:
        pair.pause_replication()
        time.sleep(0.3)
        pair.switch_over("immediate", catch_up=False)

    switch = pair.switch_over if fence == "stop" else crash
    records, began, ended = await storm(both_forms(pair, form), tmp_path, switch)
    present = await check_the_new_primary(pair.primary.url(), records)
    committed = {r["idem"] for r in records if r["outcome"] == "committed"}
    # Synchronous: what was reported COMMITTED is on the new primary, and nothing else.
    assert committed == present, (len(committed - present), len(present - committed))
    assert len(committed) > 50
    errors = Counter(r["error"] for r in records if r["error"])
    # With retries= a switch of a fraction of a second costs no write.
    assert not errors, [r["message"] for r in records if r["error"]][:3]
    print(
        f"\n[sync {level}, {fence}, {form}] {len(records)} writes, {len(committed)} "
        f"committed, errors {dict(errors)}; switch {ended - began:.2f}s, {resumed(records, ended)}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("form", ["libpq", "host-query"])
async def test_a_storm_switched_over_with_asynchronous_replication_names_what_it_lost(
    replicated_pair: MakePair, form: str, tmp_path: Path
) -> None:
    """The standby stops receiving, the old primary acknowledges writes for a while more,
    then crashes and the standby is promoted: those writes are lost (asynchronous
    replication promises nothing else). The test counts and names them; every write
    that ended after the crash, reported COMMITTED, is on the new primary."""
    pair = replicated_pair(synchronous=False)
    await setup_schema(pair.primary.url())
    await asyncio.to_thread(pair.wait_caught_up)
    crashed: list[float] = []

    def switch() -> None:
        pair.pause_replication()
        time.sleep(0.3)  # the old primary acknowledges writes the standby never gets
        crashed.append(time.time())
        pair.switch_over("immediate", catch_up=False)

    records, _, ended = await storm(both_forms(pair, form), tmp_path, switch)
    present = await check_the_new_primary(pair.primary.url(), records)
    committed = {r["idem"]: r for r in records if r["outcome"] == "committed"}
    lost = sorted(set(committed) - present)
    # Lost: acknowledged by the old primary before it crashed, never on the standby.
    assert all(committed[i]["t"] <= crashed[0] + 0.5 for i in lost), lost
    # A write that ended after the crash is COMMITTED only if the new primary has it.
    assert not [i for i in lost if committed[i]["t"] > ended]
    # Nothing is on the new primary that was not reported COMMITTED.
    assert present <= set(committed)
    assert lost, "the old primary acknowledged nothing the standby lacked: no test"
    errors = Counter(r["error"] for r in records if r["error"])
    assert not errors, [r["message"] for r in records if r["error"]][:3]
    print(
        f"\n[async, {form}] {len(records)} writes, {len(committed)} committed, "
        f"{len(lost)} lost at the failover (acknowledged by the old primary only): "
        f"{', '.join(lost[:10])}{' ...' if len(lost) > 10 else ''}; errors {dict(errors)}; "
        f"{resumed(records, ended)}"
    )


# -- 3. a standby listed first, without target_session_attrs -------------------------------


@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_a_standby_listed_first_is_a_lost_connection_that_names_the_fix(
    replicated_pair: MakePair, coordination: str
) -> None:
    """Without target_session_attrs, asyncpg connects to the first host that answers:
    the standby. Its refusal (at writeturn's BEGIN in advisory mode, at the write's
    first statement in turn mode) is ConnectionLost, ROLLED_BACK, naming the fix."""
    pair = replicated_pair(synchronous=False)
    await setup_schema(pair.primary.url())
    await asyncio.to_thread(pair.wait_caught_up)
    url = (
        f"postgresql+asyncpg://postgres@127.0.0.1:{pair.standby.port},"
        f"127.0.0.1:{pair.primary.port}/postgres"
    )

    async def write(session: AsyncSession) -> None:
        await session.execute(text("INSERT INTO ledger (key) VALUES ('k')"))

    async with (
        asyncio.timeout(60),
        WriteSerializer.from_url(url, coordination=coordination) as ser,
    ):
        handle = ser.submit(write, key="k")
        with pytest.raises(ConnectionLost, match="target_session_attrs=read-write"):
            await handle
        assert handle.outcome is Outcome.ROLLED_BACK
    assert await rows(pair.primary.url()) == []


# -- 4. doctor: the server's role, its standbys, what a failover can lose -----------------


async def test_doctor_reports_the_role_and_what_a_failover_can_lose(
    replicated_pair: MakePair,
) -> None:
    asynchronous = replicated_pair(synchronous=False)
    synchronous = replicated_pair(synchronous=True, synchronous_commit="on")

    def replication(checks: list[Any]) -> Any:
        (check,) = [c for c in checks if c.name == "replication"]
        return check

    on_standby = replication(await diagnose(asynchronous.standby.url()))
    assert on_standby.status == "FAIL" and "standby" in on_standby.detail
    assert "target_session_attrs=read-write" in (on_standby.fix or "")
    lossy = replication(await diagnose(asynchronous.primary.url()))
    assert lossy.status == "WARN" and "asynchronous" in lossy.detail
    assert "lost" in lossy.detail and "synchronous_standby_names" in (lossy.fix or "")
    safe = replication(await diagnose(synchronous.primary.url()))
    assert safe.status == "OK" and "1 synchronous" in safe.detail, safe
    # Through the multi-host URL: the primary, wherever it is.
    assert replication(await diagnose(synchronous.libpq_url())).status == "OK"
