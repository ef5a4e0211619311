"""writeturn.metrics through OpenTelemetry's SDK and its in-memory reader, on real databases:
every instrument agrees with the serializer's own stats() and with what the test did."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import text

from writeturn import ConfigurationError, Outcome, WriteSerializer
from writeturn.metrics import instrument

WRITES = 40


class Boom(Exception):
    pass


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, Any] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "writeturn"
            for metric in scope.metrics:
                found[metric.name] = metric
    return found


def points(metric: Any) -> list[Any]:
    return list(metric.data.data_points)


async def insert(session: Any, n: int, fail: bool = False) -> None:
    await session.execute(text("INSERT INTO t (n) VALUES (:n)"), {"n": n})
    if fail:
        raise Boom(n)


async def hold(session: Any, held: asyncio.Event, release: asyncio.Event) -> None:
    held.set()
    await release.wait()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


async def test_every_instrument_agrees_with_stats(
    db_url: str, reader: InMemoryMetricReader
) -> None:
    provider = MeterProvider(metric_readers=[reader])
    async with WriteSerializer.from_url(db_url, namespace="metrics-test") as ser:
        async with ser.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (n INTEGER)"))
        metrics = instrument(ser, meter_provider=provider, keys=["k"], attributes={"svc": "x"})

        # A held turn with three writes queued behind it: the queue depth shows them.
        held, release = asyncio.Event(), asyncio.Event()
        holder = ser.submit(hold, held, release, key="k")
        await held.wait()
        queued = [ser.submit(insert, 1000 + i, key="k", writer=f"w{i}") for i in range(3)]
        await asyncio.sleep(0)
        found = collect(reader)
        (depth,) = points(found["writeturn.key.queue.depth"])
        assert depth.value == 3
        assert dict(depth.attributes)["writeturn.key"] == "k"
        assert points(found["writeturn.queue.depth"])[0].value == 3
        assert points(found["writeturn.writes.running"])[0].value == 1
        queued[0].cancel()  # withdrawn: no turn, so no wait or hold sample
        release.set()
        await holder
        await asyncio.gather(*queued, return_exceptions=True)

        handles = [
            ser.submit(insert, i, fail=i % 5 == 0, key=f"key-{i % 4}", writer=f"w{i % 3}")
            for i in range(WRITES)
        ]
        await asyncio.gather(*handles, return_exceptions=True)
        stats = ser.stats()
        found = collect(reader)
        metrics.close()

    assert (stats.committed, stats.rolled_back, stats.withdrawn) == (1 + 2 + 32, 8, 1)
    writes = {
        dict(p.attributes)["writeturn.outcome"]: p.value for p in points(found["writeturn.writes"])
    }
    assert writes == {
        "committed": stats.committed,
        "rolled_back": stats.rolled_back,
        "withdrawn": stats.withdrawn,
        "unknown": stats.unknown,
    }
    assert found["writeturn.writes"].unit == "{write}"
    turns = stats.committed + stats.rolled_back  # every write that had a turn
    for name in ("writeturn.write.wait.duration", "writeturn.write.hold.duration"):
        metric = found[name]
        assert metric.unit == "s"
        (histogram,) = points(metric)
        assert histogram.count == turns, name
        assert 0 < histogram.sum < 60 * turns
        attributes = dict(histogram.attributes)
        assert attributes["writeturn.namespace"] == "metrics-test"
        assert attributes["db.system.name"] in ("sqlite", "postgresql")
        assert attributes["svc"] == "x"
    for name, field in (
        ("writeturn.cancel_requests", "cancel_requests"),
        ("writeturn.interrupts", "interrupts"),
        ("writeturn.connections.invalidated", "connections_invalidated"),
        ("writeturn.retries", "retries"),
    ):
        assert points(found[name])[0].value == getattr(stats, field), name
    assert stats.cancel_requests >= 1
    assert points(found["writeturn.queue.depth"])[0].value == 0


async def test_close_stops_the_reporting(sqlite_url: str, reader: InMemoryMetricReader) -> None:
    provider = MeterProvider(metric_readers=[reader])
    async with WriteSerializer.from_url(sqlite_url) as ser:
        async with ser.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (n INTEGER)"))
        metrics = instrument(ser, meter_provider=provider)
        await ser.run(insert, 1)
        before = points(collect(reader)["writeturn.write.hold.duration"])[0].count
        assert before == 1
        metrics.close()
        metrics.close()  # idempotent
        await ser.run(insert, 2)
        found = collect(reader)
        assert ser.stats().committed == 2
    held = points(found["writeturn.write.hold.duration"])
    assert [p.count for p in held] == [1]  # the second write was not recorded
    writes = found.get("writeturn.writes")  # observed nothing after close
    assert writes is None or not points(writes)
    assert "closed" in repr(metrics)


async def test_bad_keys_are_refused(sqlite_url: str) -> None:
    ser = WriteSerializer.from_url(sqlite_url)
    try:
        with pytest.raises(ConfigurationError, match="single string"):
            instrument(ser, keys="ledger")
        with pytest.raises(ConfigurationError, match="non-empty strings"):
            instrument(ser, keys=["ok", ""])
    finally:
        await ser.close()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_without_opentelemetry_nothing_is_imported(tmp_path: Path) -> None:
    done = run_python(
        "import sys, writeturn, writeturn.metrics, writeturn.cli\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    assert done.returncode == 0, done.stderr
    # Where opentelemetry cannot be imported, instrument() says which extra to install.
    fake = tmp_path / "site" / "opentelemetry"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError('No module named opentelemetry')\n"
    )
    done = run_python(
        "import asyncio, writeturn\n"
        "from writeturn.metrics import instrument\n"
        f"ser = writeturn.WriteSerializer.from_url('sqlite:///{tmp_path / 'x.db'}')\n"
        "try:\n"
        "    instrument(ser)\n"
        "except writeturn.ConfigurationError as exc:\n"
        "    print(exc)\n"
        "asyncio.run(ser.close())\n",
        PYTHONPATH=str(tmp_path / "site"),
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'writeturn[otel]'" in done.stdout


def test_outcome_names_match_the_outcome_enum() -> None:
    from writeturn import metrics

    finished = {o.name.lower() for o in Outcome if o is not Outcome.PENDING}
    assert set(metrics._OUTCOMES) == finished


# -- the observer hook under writeturn.metrics -------------------------------------------


class Stopped(BaseException):
    """Not an Exception, like CancelledError: an observer must not let it out either."""


@pytest.mark.parametrize("raised", [asyncio.CancelledError, Stopped, Boom])
async def test_an_observer_that_raises_never_affects_a_write(
    db_url: str, raised: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    def observer(kind: str, seconds: float) -> None:
        raise raised("from an observer")

    seen: list[str] = []
    async with asyncio.timeout(30):
        async with WriteSerializer.from_url(db_url) as ser:
            async with ser.engine.begin() as conn:
                await conn.execute(text("CREATE TABLE t (n INTEGER)"))
            ser.observe(observer)
            ser.observe(lambda kind, seconds: seen.append(kind))
            held, release = asyncio.Event(), asyncio.Event()
            holder = ser.submit(hold, held, release, key="k")
            await held.wait()
            # Queued behind the holder: one withdrawn by its timeout, three that commit.
            late = ser.submit(insert, 0, key="k", writer="late", timeout=0.05)
            queued = [ser.submit(insert, i, key="k", writer=f"w{i}") for i in (1, 2, 3)]
            with pytest.raises(TimeoutError):
                await late
            release.set()
            for handle in (holder, *queued):
                await handle
            assert late.outcome is Outcome.WITHDRAWN
            assert [h.outcome for h in (holder, *queued)] == [Outcome.COMMITTED] * 4
            stats = ser.stats()
            assert (stats.committed, stats.withdrawn, stats.queued, stats.running) == (4, 1, 0, 0)
            async with ser.engine.connect() as conn:
                rows = (await conn.execute(text("SELECT n FROM t ORDER BY n"))).scalars()
                assert list(rows) == [1, 2, 3]
    # The other observer got every sample: a wait and a hold per committed write.
    assert sorted(seen) == ["hold"] * 4 + ["wait"] * 4
    failed = [r for r in caplog.records if r.getMessage() == "a stats observer failed"]
    assert failed and all(r.exc_info and r.exc_info[0] is raised for r in failed)


async def test_an_observer_that_stops_itself_costs_the_next_one_nothing(sqlite_url: str) -> None:
    first: list[str] = []
    second: list[str] = []

    def once(kind: str, seconds: float) -> None:
        first.append(kind)
        stop_once()

    async with WriteSerializer.from_url(sqlite_url) as ser:
        stop_once = ser.observe(once)
        ser.observe(lambda kind, seconds: second.append(kind))
        await ser.run(hold, asyncio.Event(), _set(asyncio.Event()), key="k")
    assert first == ["wait"]
    assert second == ["wait", "hold"]


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event
