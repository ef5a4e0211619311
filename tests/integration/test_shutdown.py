"""Graceful shutdown of a real service: SIGTERM, then close(drain=True, timeout=...).

A service is usually stopped with SIGTERM while its writers are busy, and the promise that
matters then is that nothing it reported COMMITTED is lost, and nothing it reported
otherwise is in the database. Here a worker process (_shutdown_worker.py) runs eight
writers on two keys, each with four writes in flight, and reports every write's outcome
only after its handle settled. The test sends SIGTERM at a random moment (a seeded delay
after the worker is committing steadily); the worker stops submitting and closes its
serializer. Then the database is compared with what the worker reported:

- every write reported COMMITTED has its row exactly once, and no other write has one;
- each key's counter equals its number of rows, so no write is half-applied;
- nothing is UNKNOWN (no connection is harmed here, so UNKNOWN would be a misreport);
- the writes still in flight at SIGTERM all settled during close(): with a generous
  timeout they were drained, so all COMMITTED; with a tight one the rest were stopped, so
  each is COMMITTED, WITHDRAWN, or (at most one per key: the write that was running)
  ROLLED_BACK, and the stopped ones raised SerializerClosed;
- writes committed both before and after the signal, so it landed mid-run;
- the process exited 0 within the close timeout plus a margin.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from writeturn import Outcome, SerializerClosed, WriteSerializer

from ._db import counter, create_tables, ledger, pg_leftovers, quietly, serializer

WORKER = Path(__file__).with_name("_shutdown_worker.py")
KEYS = ("k0", "k1")  # the worker's keys: k0 .. k{KEYS - 1}
READY_AFTER = 10  # the worker says "ready" after this many commits
GENEROUS = 5.0  # a close timeout the drain never needs (it takes well under a second)
TIGHT = 0.2  # a close timeout that cuts the drain short (its ~30 queued writes need more)
EXIT_MARGIN = 3.0  # seconds past the close timeout for disposing the engine and exiting
STARTUP_LIMIT = 30.0


async def run_worker(url: str, close_timeout: float, delay: float) -> tuple[list[Any], float]:
    """Start the worker, SIGTERM it ``delay`` seconds after it is ready, and wait for its exit.

    Returns its stdout lines (parsed) and the seconds from the signal to its exit.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        url,
        str(close_timeout),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[Any] = []
    ready = asyncio.Event()

    async def read_stdout() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = json.loads(raw)
            lines.append(line)
            if line.get("event") == "ready":
                ready.set()

    reader = asyncio.create_task(read_stdout())
    errors = asyncio.create_task(proc.stderr.read())
    try:
        waiting = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait(
            {waiting, reader}, timeout=STARTUP_LIMIT, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        if not ready.is_set():
            if reader in done:  # stdout closed: the worker is exiting
                await asyncio.wait_for(proc.wait(), 5)
            raise AssertionError(
                f"the worker was not ready within {STARTUP_LIMIT}s (exit {proc.returncode}); "
                f"stdout {lines[-5:]}; stderr {(await asyncio.wait_for(errors, 5)).decode()}"
            )
        await asyncio.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            await asyncio.wait_for(proc.wait(), close_timeout + EXIT_MARGIN)
        except TimeoutError:
            raise AssertionError(
                f"the worker did not exit within {close_timeout + EXIT_MARGIN}s of SIGTERM "
                f"(close timeout {close_timeout}s); last lines {lines[-5:]}"
            ) from None
        took = time.monotonic() - signalled
        await asyncio.wait_for(reader, 5)
        err = (await asyncio.wait_for(errors, 5)).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for task in (reader, errors):
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-3000:]}"
    assert err == "", f"the worker wrote to stderr: {err[-3000:]}"
    return lines, took


def one(lines: list[Any], event: str) -> Any:
    found = [line for line in lines if line.get("event") == event]
    assert len(found) == 1, f"{len(found)} {event!r} lines: {found}"
    return found[0]


@pytest.mark.parametrize(
    ("seed", "close_timeout"),
    [
        pytest.param(1, GENEROUS, id="drained-1"),
        pytest.param(2, GENEROUS, id="drained-2"),
        pytest.param(3, TIGHT, id="cut-short-3"),
    ],
)
async def test_sigterm_and_close_lose_nothing_reported_committed(
    db_url: str, seed: int, close_timeout: float
) -> None:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine, *KEYS)
    delay = random.Random(seed).uniform(0.0, 0.5)

    lines, exit_took = await run_worker(db_url, close_timeout, delay)

    sigterm, closed, summary = one(lines, "sigterm"), one(lines, "closed"), one(lines, "summary")
    assert not [line for line in lines if line.get("event") == "no-sigterm"]
    settled = [line for line in lines if "id" in line]
    ids = Counter(line["id"] for line in settled)
    assert [i for i, n in ids.items() if n > 1] == [], "a write was reported twice"
    by_id = {line["id"]: line for line in settled}
    # Every write submitted was reported once, and none was submitted after SIGTERM.
    assert set(by_id) == set(range(summary["submitted"]))
    assert summary["submitted"] == sigterm["submitted"]
    # close() itself settled everything: nothing was pending when it returned.
    assert closed["unsettled"] == []

    outcomes = Counter(line["outcome"] for line in settled)
    pending = set(sigterm["pending"])
    before = [by_id[i] for i in sorted(set(by_id) - pending)]
    after = [by_id[i] for i in sorted(pending)]
    after_outcomes = Counter(line["outcome"] for line in after)
    print(
        f"\nSIGTERM {delay:.2f}s after ready; {len(before)} settled before it, "
        f"{len(after)} in flight: {dict(after_outcomes)}; close() took {closed['took']}s, "
        f"exit {exit_took:.2f}s after the signal"
    )
    assert outcomes["unknown"] == 0, "no connection was harmed, so UNKNOWN is a misreport"
    assert {line["outcome"] for line in before} == {"committed"}
    assert len(before) >= READY_AFTER
    assert not [line for line in settled if line["outcome"] == "pending"]
    if close_timeout == GENEROUS:
        # Drained: every write queued or running at SIGTERM committed.
        assert set(after_outcomes) == {"committed"}, after_outcomes
        assert closed["took"] < close_timeout
    else:
        # Cut short: drained for close_timeout, then the rest stopped.
        assert set(after_outcomes) <= {"committed", "withdrawn", "rolled_back"}, after_outcomes
        assert after_outcomes["withdrawn"] >= 1, "the tight close timeout stopped nothing"
        assert after_outcomes["rolled_back"] <= len(KEYS)
        assert close_timeout <= closed["took"] < close_timeout + 1.0
    assert after_outcomes["committed"] >= 3, "the signal did not land mid-run"
    for line in settled:
        expected_error = None if line["outcome"] == "committed" else "SerializerClosed"
        assert line["error"] == expected_error, line
    assert exit_took < close_timeout + EXIT_MARGIN

    committed = {i for i, line in by_id.items() if line["outcome"] == "committed"}
    async with serializer(db_url) as check:
        rows = await ledger(check.engine)
        counters = {key: await counter(check.engine, key) for key in KEYS}
        leftovers = await pg_leftovers(check.engine)
    seqs = Counter(seq for _, _, _, seq in rows)
    assert [s for s, n in seqs.items() if n > 1] == [], "a write was applied twice"
    assert set(seqs) - committed == set(), "rows of writes not reported COMMITTED"
    assert committed - set(seqs) == set(), "writes reported COMMITTED are missing"
    for _, key, _, seq in rows:
        assert key == by_id[seq]["key"]
    per_key = Counter(key for _, key, _, _ in rows)
    assert counters == {key: per_key[key] for key in KEYS}, "a write was half-applied"
    assert leftovers == (0, 0)
    assert closed["stats_committed"] == summary["committed"] == len(committed)
    if db_url.startswith("sqlite"):
        path = make_url(db_url).database
        assert path is not None
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            db.close()


# -- close() itself: no write is accepted once it has been called ----------------------


async def _nothing(session: Any) -> int:
    return 1


@pytest.mark.parametrize("drain", [True, False])
async def test_close_refuses_writes_from_the_moment_it_is_called(db_url: str, drain: bool) -> None:
    ser = WriteSerializer.from_url(db_url)
    await ser.start()
    before = ser.submit(_nothing, key="k")  # accepted before close(): drained or stopped
    closing = asyncio.create_task(ser.close(drain=drain))
    # The close's task has not run yet, and already nothing more is accepted.
    with pytest.raises(SerializerClosed, match="closing"):
        ser.submit(_nothing, key="k")
    await asyncio.sleep(0)  # the task has started; its close task has not
    with pytest.raises(SerializerClosed, match="closing"):
        ser.submit(_nothing, key="k")
    with pytest.raises(SerializerClosed, match="closing"):
        ser.transaction(key="k")
    await closing
    assert (await quietly(before)) == 1 if drain else before.outcome is Outcome.WITHDRAWN
    with pytest.raises(SerializerClosed, match="closed"):
        ser.submit(_nothing, key="k")


async def test_a_close_not_yet_awaited_already_refuses_writes(sqlite_url: str) -> None:
    ser = WriteSerializer.from_url(sqlite_url)
    await ser.start()
    closing = ser.close()
    with pytest.raises(SerializerClosed, match="closing"):
        ser.submit(_nothing, key="k")
    await closing
    assert " closed " in repr(ser)


async def test_close_called_while_start_connects_wins(db_url: str) -> None:
    """close() during start()'s connection: start() must not reopen the serializer."""
    ser = WriteSerializer.from_url(db_url)
    starting = asyncio.ensure_future(ser.start())
    await asyncio.sleep(0)  # start() is connecting
    closing = ser.close()
    with pytest.raises(SerializerClosed):
        await starting
    await closing
    with pytest.raises(SerializerClosed):
        ser.submit(_nothing, key="k")
