"""Guarantee 3 across processes on one SQLite file: the processes take turns at the write lock.

SQLite's own lock lets the process that just committed take it again while the
others sleep in their busy handlers; in advisory mode the serializers line up
in a ticket queue beside the file instead. These tests run real processes on
a real file, read the commit order back from the database, and kill or freeze
a process that holds a place in the line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
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
from ._turns_worker import TURNS_DDL, insert

WORKER = Path(__file__).with_name("_turns_worker.py")
PROCESSES, WRITERS, WRITES = 3, 2, 40


@dataclass
class Turns:
    """What the commit order says about the turns between processes."""

    order: list[int]  # the pid of each commit, in commit order
    longest_run: int  # most commits in a row by one process while another had writes waiting
    first_turn: dict[str, int]  # writer -> commits by others before its first
    longest_gap: int  # most commits by others between two commits of one writer

    def __str__(self) -> str:
        names = {pid: str(i) for i, pid in enumerate(dict.fromkeys(self.order))}
        return (
            f"order {''.join(names[p] for p in self.order)}\n"
            f"longest run by one process while another waited: {self.longest_run}; "
            f"first turn of each writer after (commits): {sorted(self.first_turn.values())}; "
            f"longest gap between a writer's commits: {self.longest_gap}"
        )


def measure(rows: list[tuple[int, str, float]], submitted: dict[int, float]) -> Turns:
    """Read the turns from (pid, writer, time) rows in commit order.

    A process waits at a commit if it had queued its writes before that commit
    and still has writes to commit after it.
    """
    last = {pid: max(i for i, r in enumerate(rows) if r[0] == pid) for pid in submitted}
    longest = run = 0
    for i, (pid, _, t) in enumerate(rows):
        run = run + 1 if i and rows[i - 1][0] == pid else 1
        waiting = any(q != pid and submitted[q] <= t and last[q] > i for q in submitted)
        if waiting:
            longest = max(longest, run)
    seen: dict[str, int] = {}
    gap = 0
    for i, (_, writer, _) in enumerate(rows):
        if writer in seen:
            gap = max(gap, i - seen[writer] - 1)
        seen[writer] = i
    first: dict[str, int] = {}
    for i, (_, writer, _) in enumerate(rows):
        first.setdefault(writer, i)
    return Turns([r[0] for r in rows], longest, first, gap)


async def run_processes(path: Path, coordination: str, tmp_path: Path) -> Turns:
    url = f"sqlite:///{path}"
    async with serializer(url) as ser:
        async with ser.engine.begin() as conn:
            await conn.exec_driver_sql(TURNS_DDL)
    barrier = tmp_path / "go"
    args = [str(WORKER), url, coordination, str(WRITERS), str(WRITES), str(barrier)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(PROCESSES)
    ]
    await asyncio.sleep(1.0)  # let them import and connect: they then wait for the barrier
    barrier.touch()
    submitted: dict[int, float] = {}
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        report = json.loads(out.decode().strip().splitlines()[-1])
        assert report["committed"] == WRITERS * WRITES
        submitted[report["pid"]] = report["submitted"]
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT pid, writer, t, n FROM turns WHERE n >= 0 ORDER BY id").fetchall()
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()
    # Every write committed exactly once, and each writer's in submission order.
    by_writer: dict[str, list[int]] = defaultdict(list)
    for _, writer, _, n in rows:
        by_writer[writer].append(n)
    assert len(by_writer) == PROCESSES * WRITERS
    assert all(ns == list(range(WRITES)) for ns in by_writer.values()), by_writer
    return measure([(pid, writer, t) for pid, writer, t, _ in rows], submitted)


@pytest.mark.slow
async def test_processes_take_turns_on_one_sqlite_file(tmp_path: Path) -> None:
    turns = await run_processes(tmp_path / "turns.db", "advisory", tmp_path)
    print(f"\n[advisory] {turns}")
    assert turns.longest_run <= 2
    # Six writers: each has its first turn within the first round or so.
    assert max(turns.first_turn.values()) <= 2 * PROCESSES * WRITERS
    assert turns.longest_gap <= 3 * PROCESSES * WRITERS


@pytest.mark.slow
async def test_without_the_queue_one_process_drains_its_backlog(tmp_path: Path) -> None:
    """The control: in turn mode (no line), SQLite's own lock is not taken in turn."""
    turns = await run_processes(tmp_path / "turns.db", "turn", tmp_path)
    print(f"\n[turn] {turns}")
    assert turns.longest_run > 2


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
            await conn.exec_driver_sql(TURNS_DDL)
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
            await conn.exec_driver_sql(TURNS_DDL)
        await ser.run(insert, "w", 0)
        other = await join_in_another_process(path)
        os.kill(other.pid, signal.SIGSTOP)  # alive, holding an earlier ticket, never moving
        try:
            began = time.monotonic()
            async with asyncio.timeout(20):
                await ser.run(insert, "w", 1)
            took = time.monotonic() - began
            # A write with a timeout shorter than that patience ends on time instead.
            began = time.monotonic()
            h = ser.submit(insert, "w", 2, timeout=0.3)
            async with asyncio.timeout(10):
                exc = await quietly(h)
            timed_out = time.monotonic() - began
        finally:
            os.kill(other.pid, signal.SIGCONT)
            other.kill()
            await other.wait()
        print(
            f"\nwaited {took:.2f}s behind a frozen process; a 0.3 s write ended in {timed_out:.2f}s"
        )
        # Patience is the busy timeout plus one second: then SQLite's lock decides.
        assert 1.0 <= took < 10
        # It waited in line inside its transaction's BEGIN: rolled back, on time.
        assert isinstance(exc, TurnTimeout), repr(exc)
        assert h.outcome is Outcome.ROLLED_BACK
        assert timed_out < 1.5
