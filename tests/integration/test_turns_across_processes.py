"""Guarantee 3 across processes: turns alternate between processes on Postgres and on SQLite.

On Postgres the advisory lock's wait queue is first-come-first-served. SQLite's
own lock is not: the process that just committed takes it again while the
others sleep in their busy handlers, so in advisory mode the serializers line
up in a ticket queue beside the file. These tests run real processes, read
the commit order back from the database, and kill or freeze a process that
holds a place in SQLite's line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from writeturn import Outcome, TurnTimeout

from ._db import quietly, serializer
from ._turns_worker import insert, turns_ddl

WORKER = Path(__file__).with_name("_turns_worker.py")
PROCESSES, WRITERS, WRITES = 3, 2, 40


@dataclass
class Turns:
    """What the commit order says about the turns between processes."""

    order: list[int]  # the pid of each commit, in commit order
    longest_run: int  # most commits in a row by one process while another waited
    first_turn: dict[str, int]  # writer -> commits by others after it queued, before its first
    longest_gap: int  # most commits by others between two commits of one writer

    def __str__(self) -> str:
        names = {pid: str(i) for i, pid in enumerate(dict.fromkeys(self.order))}
        return (
            f"order {''.join(names[p] for p in self.order)}\n"
            f"longest run by one process while another waited: {self.longest_run}; "
            f"commits by others before each writer's first: {sorted(self.first_turn.values())}; "
            f"longest gap between a writer's commits: {self.longest_gap}"
        )


def measure(rows: list[tuple[int, str, float]], submitted: dict[int, float]) -> Turns:
    """Read the turns from (pid, writer, time) rows in commit order.

    A process waits at a commit if it has had a turn already and still has
    writes to commit: every process queues all its writes at once, so from
    its first commit to its last it always has one waiting. Before its first
    commit, what counts is how many commits others made after it had queued
    its writes (``first_turn``): a loaded machine starts the processes a few
    milliseconds apart, and a process whose loop has not yet run its first
    write is not waiting for the lock.
    """
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, (pid, _, _) in enumerate(rows):
        first.setdefault(pid, i)
        last[pid] = i
    longest = run = 0
    for i, (pid, _, _) in enumerate(rows):
        run = run + 1 if i and rows[i - 1][0] == pid else 1
        if any(q != pid and first[q] < i < last[q] for q in first):
            longest = max(longest, run)
    seen: dict[str, int] = {}
    first_turn: dict[str, int] = {}
    gap = 0
    for i, (pid, writer, _) in enumerate(rows):
        if writer in seen:
            gap = max(gap, i - seen[writer] - 1)
        else:
            first_turn[writer] = sum(1 for q, _, t in rows[:i] if q != pid and t >= submitted[pid])
        seen[writer] = i
    return Turns([r[0] for r in rows], longest, first_turn, gap)


def wait_until_ready(tmp_path: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while len(list(tmp_path.glob("go.ready.*"))) < PROCESSES:
        assert time.monotonic() < deadline, "the writer processes did not get ready"
        time.sleep(0.02)


async def run_processes(url: str, coordination: str, tmp_path: Path) -> Turns:
    async with serializer(url) as ser:
        async with ser.engine.begin() as conn:
            await conn.exec_driver_sql(turns_ddl(url))
    barrier = tmp_path / "go"
    args = [str(WORKER), url, coordination, str(WRITERS), str(WRITES), str(barrier)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(PROCESSES)
    ]
    await asyncio.to_thread(wait_until_ready, tmp_path)  # imported and connected, all of them
    barrier.touch()
    submitted: dict[int, float] = {}
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        report = json.loads(out.decode().strip().splitlines()[-1])
        assert report["committed"] == WRITERS * WRITES
        submitted[report["pid"]] = report["submitted"]
    async with serializer(url) as ser, ser.engine.connect() as conn:
        rows = [
            tuple(r)
            for r in await conn.execute(
                text("SELECT pid, writer, t, n FROM turns WHERE n >= 0 ORDER BY id")
            )
        ]
        if conn.dialect.name == "sqlite":
            check = await conn.exec_driver_sql("PRAGMA integrity_check")
            assert check.fetchall() == [("ok",)]
        await conn.rollback()
    # Every write committed exactly once, and each writer's in submission order.
    by_writer: dict[str, list[int]] = defaultdict(list)
    for _, writer, _, n in rows:
        by_writer[writer].append(n)
    assert len(by_writer) == PROCESSES * WRITERS
    assert all(ns == list(range(WRITES)) for ns in by_writer.values()), by_writer
    return measure([(pid, writer, t) for pid, writer, t, _ in rows], submitted)


@pytest.mark.slow
async def test_processes_take_turns(db_url: str, tmp_path: Path) -> None:
    """3 processes x 2 writers x 40 writes queued at once on one key, in advisory mode."""
    turns = await run_processes(db_url, "advisory", tmp_path)
    print(f"\n[advisory, {db_url.partition(':')[0]}] {turns}")
    if db_url.startswith("sqlite"):
        # A place in SQLite's line is held from before BEGIN until the lock is taken.
        assert turns.longest_run <= 2
    else:
        # Postgres queues a session only once its lock request arrives: on a
        # saturated machine a process whose request is late sits out a round
        # (runs of 4 seen then; 1 or 2 otherwise). Never a drained backlog.
        assert turns.longest_run <= 2 * PROCESSES
    # Six writers: each has its first turn within the first two rounds.
    assert max(turns.first_turn.values()) <= 2 * PROCESSES * WRITERS
    assert turns.longest_gap <= 3 * PROCESSES * WRITERS


@pytest.mark.slow
async def test_without_the_queue_one_process_drains_its_backlog(tmp_path: Path) -> None:
    """The control: in turn mode (no line), SQLite's own lock is not taken in turn.

    A process that drains its backlog shows either as a long run while another
    process, which has had a turn, waits, or, when it drains before the others
    had any turn, as their late first turns: both are what the advisory test
    above bounds, and here at least one of them must be broken."""
    turns = await run_processes(f"sqlite:///{tmp_path / 'turns.db'}", "turn", tmp_path)
    print(f"\n[turn] {turns}")
    assert turns.longest_run > 2 or max(turns.first_turn.values()) > 2 * PROCESSES * WRITERS, turns


# -- a process that holds a place in the line dies or freezes -------------------------

# Another process: join the queue of the database file, say so, then wait to be killed.
JOINER = """
import sys, time
from writeturn._sqlite_queue import TicketQueue
queue = TicketQueue(sys.argv[1])
assert queue.join()
print(queue.ticket, flush=True)
time.sleep(60)
"""


async def join_in_another_process(path: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", JOINER, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        assert int(await proc.stdout.readline()) > 0
    return proc


async def test_a_process_killed_in_line_leaves_no_stuck_queue(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    async with serializer(f"sqlite:///{path}", sqlite_busy_timeout=5.0) as ser:
        async with ser.engine.begin() as conn:
            await conn.exec_driver_sql(turns_ddl("sqlite"))
        await ser.run(insert, "w", 0)  # opens this serializer's place in the line
        other = await join_in_another_process(path)
        try:
            h = ser.submit(insert, "w", 1)
            await asyncio.sleep(0.5)
            assert not h.done()  # it waits behind the other process's earlier ticket
            killed = time.monotonic()
            os.kill(other.pid, signal.SIGKILL)
            async with asyncio.timeout(10):
                await h
            took = time.monotonic() - killed
        finally:
            if other.returncode is None:
                other.kill()
            await other.wait()
        print(f"\nthe write went ahead {took:.3f}s after the process in front was killed")
        assert h.outcome is Outcome.COMMITTED
        # The dead ticket was dropped at once, not waited out (busy timeout 5 s + 1 s).
        assert took < 3.0
        # And the line works for the next writes.
        for n in range(2, 5):
            await ser.run(insert, "w", n)
        async with ser.engine.connect() as conn:
            got = (await conn.execute(text("SELECT n FROM turns ORDER BY id"))).scalars().all()
    assert got == [0, 1, 2, 3, 4]


async def test_a_frozen_process_in_line_is_waited_for_only_so_long(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    async with serializer(f"sqlite:///{path}", sqlite_busy_timeout=0.5) as ser:
        async with ser.engine.begin() as conn:
            await conn.exec_driver_sql(turns_ddl("sqlite"))
        await ser.run(insert, "w", 0)
        other = await join_in_another_process(path)
        os.kill(other.pid, signal.SIGSTOP)  # alive, holding an earlier ticket, never moving
        try:
            # A write with a timeout shorter than the patience ends on time.
            began = time.monotonic()
            h = ser.submit(insert, "w", 1, timeout=0.3)
            async with asyncio.timeout(10):
                exc = await quietly(h)
            timed_out = time.monotonic() - began
            began = time.monotonic()
            async with asyncio.timeout(20):
                await ser.run(insert, "w", 2)
            took = time.monotonic() - began
            # The frozen ticket has cost one patience: the next writes pass it over.
            began = time.monotonic()
            async with asyncio.timeout(20):
                for i in range(3, 6):
                    await ser.run(insert, "w", i)
            then = time.monotonic() - began
        finally:
            os.kill(other.pid, signal.SIGCONT)
            other.kill()
            await other.wait()
        print(
            f"\na 0.3 s write ended in {timed_out:.2f}s; waited {took:.2f}s behind a frozen "
            f"process, then {then:.2f}s for three more writes"
        )
        # It waited in line inside its transaction's BEGIN: rolled back, on time.
        assert isinstance(exc, TurnTimeout), repr(exc)
        assert h.outcome is Outcome.ROLLED_BACK
        assert timed_out < 1.5
        # Patience is the busy timeout plus one second: then SQLite's lock decides.
        patience = 0.5 + 1.0
        assert 1.0 <= took < 10
        assert then < patience, "a frozen holder costs the others one patience, not one per write"
