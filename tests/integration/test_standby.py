"""The replicated_pair fixture does what failover tests rely on, against real servers:
synchronous commits are on the standby when COMMIT returns, a cut-off asynchronous
standby loses what the primary commits after, a fence refuses writes with SQLSTATE
25006, a promoted standby is on a new timeline and takes writes, and a multi-host URL
with target_session_attrs=read-write finds the primary before and after a switch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from . import _standby
from ._standby import Cluster, ReplicatedPair, StandbyUnavailable

pytestmark = [pytest.mark.postgres, pytest.mark.standby]

MakePair = Callable[..., ReplicatedPair]


async def connect(cluster: Cluster) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=cluster.port, user="postgres", database="postgres", timeout=10
    )


async def count(cluster: Cluster, value: int) -> int:
    conn = await connect(cluster)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM t WHERE x = $1", value))
    finally:
        await conn.close()


async def insert(cluster: Cluster, value: int) -> None:
    conn = await connect(cluster)
    try:
        await conn.execute("INSERT INTO t VALUES ($1)", value)
    finally:
        await conn.close()


def with_table(pair: ReplicatedPair) -> ReplicatedPair:
    pair.primary.sql("CREATE TABLE t (x int)")
    pair.wait_caught_up()
    return pair


async def test_a_synchronous_commit_is_on_the_standby_when_commit_returns(
    replicated_pair: MakePair,
) -> None:
    pair = with_table(replicated_pair(synchronous=True))
    for value in range(20):
        await insert(pair.primary, value)
        assert await count(pair.standby, value) == 1  # no wait in between
    assert pair.standby.in_recovery()


async def test_a_cut_off_asynchronous_standby_loses_what_the_primary_commits(
    replicated_pair: MakePair,
) -> None:
    pair = with_table(replicated_pair(synchronous=False))
    await insert(pair.primary, 1)
    pair.wait_caught_up()
    old, new = pair.primary, pair.standby
    before = old.timeline()
    pair.pause_replication()
    await insert(old, 2)  # acknowledged by the primary alone
    assert await count(new, 2) == 0
    pair.switch_over()
    assert (pair.primary, pair.standby) == (new, old)
    assert not new.in_recovery()
    assert new.timeline() > before
    assert await count(new, 1) == 1
    assert await count(new, 2) == 0  # lost in the failover
    await insert(new, 3)
    assert await count(new, 3) == 1


async def test_paused_replay_alone_hides_a_row_until_a_promotion_replays_it(
    replicated_pair: MakePair,
) -> None:
    # Postgres behaviour failover tests must not trip on: the standby still receives
    # the WAL while replay is paused, and a promotion replays all it has received.
    pair = with_table(replicated_pair(synchronous=False))
    old, new = pair.primary, pair.standby
    new.pause_replay()
    await insert(old, 1)
    assert await count(new, 1) == 0
    pair.switch_over(fence="stop")
    assert new.timeline() == 2
    assert await count(new, 1) == 1


async def test_a_read_only_fence_refuses_writes_with_25006_and_serves_reads(
    replicated_pair: MakePair,
) -> None:
    pair = with_table(replicated_pair(synchronous=False))
    await insert(pair.primary, 1)
    pair.primary.make_read_only()
    with pytest.raises(asyncpg.PostgresError) as caught:
        await insert(pair.primary, 2)
    assert caught.value.sqlstate == "25006"
    assert await count(pair.primary, 1) == 1
    pair.primary.make_writable()
    await insert(pair.primary, 2)
    assert await count(pair.primary, 2) == 1


async def where_a_fresh_engine_writes(url: str) -> tuple[int, bool]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            row = (await conn.execute(text("SELECT inet_server_port(), pg_is_in_recovery()"))).one()
            await conn.execute(text("INSERT INTO t VALUES (inet_server_port())"))
        return int(row[0]), bool(row[1])
    finally:
        await engine.dispose()


@pytest.mark.parametrize("fence", ["stop", "read_only"])
async def test_a_multi_host_url_finds_the_primary_before_and_after_a_switch(
    replicated_pair: MakePair, fence: str
) -> None:
    pair = with_table(replicated_pair(synchronous=True))
    url = pair.host_query_url()
    assert await where_a_fresh_engine_writes(url) == (pair.first.port, False)
    before = pair.primary.timeline()
    pair.switch_over(fence=fence)  # type: ignore[arg-type]
    assert pair.primary is pair.second
    assert pair.primary.timeline() == before + 1
    assert await where_a_fresh_engine_writes(url) == (pair.second.port, False)
    # The new primary has what the old one committed, synchronous, and its own write.
    assert await count(pair.primary, pair.first.port) == 1
    assert await count(pair.primary, pair.second.port) == 1
    # Each server alone, through its plain URL.
    assert await where_a_fresh_engine_writes(pair.primary.url()) == (pair.second.port, False)
    if fence == "read_only":
        with pytest.raises(Exception, match="read-only"):
            await where_a_fresh_engine_writes(pair.standby.url())
    assert pair.libpq_url("db").endswith(
        f"@127.0.0.1:{pair.first.port},127.0.0.1:{pair.second.port}/db"
        "?target_session_attrs=read-write"
    )


def test_without_server_binaries_the_fixture_skips_or_fails_when_required(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_standby, "PG_ROOT", tmp_path)
    with pytest.raises(StandbyUnavailable, match="no Postgres server binaries"):
        _standby.bin_dir()
    monkeypatch.delenv(_standby.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no binaries"):
        _standby._unavailable("no binaries")
    monkeypatch.setenv(_standby.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"WRITETURN_REQUIRE_STANDBY=1"):
        _standby._unavailable("no binaries")
