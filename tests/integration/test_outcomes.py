"""A write's outcome is learned from the write itself: never from another write of its
batch, never assumed from an attempt that could not tell.

Postgres, with a relay that cuts the connection as COMMIT goes out (before it reaches
the server, or after the server committed) and can then refuse every connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlalchemy import event

from writeturn import Outcome, OutcomeUnknown, migrations

from ._db import create_tables, ledger, quietly, record, serializer
from ._proxy import PROXIED, CuttingProxy

pytestmark = pytest.mark.postgres


def _arm_at_commit(engine: Any, proxy: CuttingProxy) -> Any:
    def arm(conn: Any) -> None:  # runs just before COMMIT is sent: the first one is cut
        proxy.armed = proxy.cuts == 0

    event.listen(engine.sync_engine, "commit", arm)
    return lambda: event.remove(engine.sync_engine, "commit", arm)


@pytest.mark.parametrize("where", ["before", "after"])
async def test_a_batch_is_not_reported_by_the_journal_row_of_its_duplicate(
    pg_url: str, where: str
) -> None:
    """A batch holds a duplicate (its idempotency key committed long ago) and a new write;
    its COMMIT is cut. The new write's outcome comes from its own journal row: the
    duplicate's old row says nothing about this transaction."""
    await migrations.upgrade_async(pg_url)
    async with CuttingProxy(pg_url, where) as proxy:
        options: dict[str, Any] = {"coordination": "turn", "batch_max": 16, **PROXIED}
        async with serializer(proxy.url, **options) as ser:
            await create_tables(ser.engine)
            await ser.run(record, "k", "old", 1, key="k", idempotency_key="old")
            disarm = _arm_at_commit(ser.engine, proxy)
            try:
                # Submitted together: the second joins the first's batch.
                dup = ser.submit(record, "k", "old again", 2, key="k", idempotency_key="old")
                new = ser.submit(record, "k", "new", 3, key="k", idempotency_key="new")
                async with asyncio.timeout(30):
                    await asyncio.gather(quietly(dup), quietly(new))
            finally:
                disarm()
            assert proxy.cuts == 1
            writers = [r[2] for r in await ledger(ser.engine)]
            landed = "new" in writers
            assert landed is (where == "after")
            assert writers.count("old") == 1 and "old again" not in writers
            assert new.outcome is (Outcome.COMMITTED if landed else Outcome.ROLLED_BACK), (
                f"new write: {new.outcome.value}, its row {'is' if landed else 'is not'} there"
            )
            assert (dup.outcome, dup.duplicate) == (Outcome.COMMITTED, True)


async def _commit_cut_then_unreachable(
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
    coordination: str,
    *,
    down_for: float | None,
    retries: int,
) -> tuple[Any, list[str], int]:
    """A write whose COMMIT lands but whose answer is cut, with the database unreachable
    afterwards for ``down_for`` seconds (None: until the write has ended)."""
    await migrations.upgrade_async(pg_url)
    async with CuttingProxy(pg_url, "after") as proxy:
        options: dict[str, Any] = {"retries": retries, "retry_backoff": 0.5, **PROXIED}
        async with serializer(proxy.url, coordination=coordination, **options) as ser:
            await create_tables(ser.engine)
            proxy.refuse_on_cut = True
            disarm = _arm_at_commit(ser.engine, proxy)
            caplog.clear()
            try:
                h = ser.submit(record, "k", "cut", 1, key="k", idempotency_key="ik-cut")

                async def back_up() -> None:
                    assert down_for is not None
                    await proxy.was_cut.wait()
                    await asyncio.sleep(down_for)
                    await proxy.accept()

                reopen = asyncio.ensure_future(back_up()) if down_for is not None else None
                async with asyncio.timeout(60):
                    await quietly(h)
                if reopen is not None:
                    await reopen
            finally:
                disarm()
            warnings = sum(
                1 for r in caplog.records if r.name == "writeturn" and r.levelno >= logging.WARNING
            )
            if proxy.server is None:
                await proxy.accept()
            assert proxy.cuts == 1
            return h, [r[2] for r in await ledger(ser.engine)], warnings


@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_a_retry_that_cannot_reach_the_database_keeps_the_outcome_unknown(
    pg_url: str, caplog: pytest.LogCaptureFixture, coordination: str
) -> None:
    """The first COMMIT landed, its fate could not be learned, and no retry could connect:
    the write may have committed, so it is UNKNOWN, never ROLLED_BACK."""
    h, writers, warnings = await _commit_cut_then_unreachable(
        pg_url, caplog, coordination, down_for=None, retries=2
    )
    assert writers == ["cut"]  # it had landed
    assert h.outcome is Outcome.UNKNOWN, f"{h.outcome.value}: {h.exception()!r}"
    assert isinstance(h.exception(), OutcomeUnknown)
    # Each unresolved COMMIT and each failed attempt says so once, not every 0.1 s.
    assert warnings <= 6, f"{warnings} warnings"


@pytest.mark.parametrize("coordination", ["turn", "advisory"])
async def test_retries_go_on_past_a_failed_reconnect_and_learn_the_truth(
    pg_url: str, caplog: pytest.LogCaptureFixture, coordination: str
) -> None:
    """The database comes back while retries remain: the retry finds the first attempt's
    journal row, so the write is COMMITTED once, not rolled back at the first reconnect."""
    h, writers, _ = await _commit_cut_then_unreachable(
        pg_url, caplog, coordination, down_for=6.5, retries=6
    )
    assert writers == ["cut"]
    assert (h.outcome, h.duplicate) == (Outcome.COMMITTED, True), repr(h.exception())
