"""SQLite's line across processes is an aid, never a hazard.

Whatever happens to the line's files (truncated, zeroed, a counter gone
wrong, replaced by something else), every process goes on writing; a
process that dies, even one whose forked child lives on, gives its place
up; a frozen process costs the others one patience, once. These tests run
real processes on a real SQLite file and read what they committed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from writeturn._sqlite_queue import SLOTS, queue_path
from writeturn.dialects import _PATIENCE

from ._db import serializer
from ._line_worker import LINE_DDL, insert

WORKER = Path(__file__).with_name("_line_worker.py")

# The queue file's layout: magic, counter, slots in use, then one ticket per slot.
HEADER = struct.Struct("<8sqq")


def tickets(path: Path) -> list[int]:
    """The tickets in the queue file of the database ``path``, slot by slot."""
    data = queue_path(path).read_bytes().ljust(HEADER.size + 8 * SLOTS, b"\0")
    return list(struct.unpack_from(f"<{SLOTS}q", data, HEADER.size))


async def create_table(url: str) -> None:
    async with serializer(url) as ser, ser.engine.begin() as conn:
        await conn.exec_driver_sql(LINE_DDL)


async def committed(url: str) -> dict[int, list[int]]:
    """pid -> the numbers it committed, in commit order; the file must be intact."""
    async with serializer(url) as ser, ser.engine.connect() as conn:
        check = await conn.exec_driver_sql("PRAGMA integrity_check")
        assert check.fetchall() == [("ok",)]
        rows = (await conn.execute(text("SELECT pid, n FROM line ORDER BY id"))).all()
        await conn.rollback()
    by_pid: dict[int, list[int]] = {}
    for pid, n in rows:
        by_pid.setdefault(pid, []).append(n)
    return by_pid


def wait_until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.01)


def wait_for_files(tmp_path: Path, pattern: str, count: int, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while len(list(tmp_path.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"no {count} files {pattern} in time"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a process that ended but was not reaped yet does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def end(pid: int) -> None:
    """Wake ``pid`` if it is frozen, then kill it (gone already is fine)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# -- 1. the queue file is truncated or zeroed while processes write ---------------------

PROCESSES, WRITES = 3, 120


async def test_truncating_the_queue_file_while_processes_write(tmp_path: Path) -> None:
    """A clean-up script or a log rotation empties the queue file under the writers.

    Before, every writer touched a memory-mapped page past the end of the file
    and died of SIGBUS. Now the file is rebuilt and the writers go on."""
    path = tmp_path / "t.db"
    url = f"sqlite:///{path}"
    await create_table(url)
    barrier = tmp_path / "go"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            "write",
            url,
            str(WRITES),
            str(barrier),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(PROCESSES)
    ]
    rng = random.Random(20261207)
    cuts = 0
    try:
        await asyncio.to_thread(wait_for_files, tmp_path, "go.ready.*", PROCESSES)
        barrier.touch()
        outputs = [asyncio.ensure_future(p.communicate()) for p in procs]
        file = queue_path(path)
        async with asyncio.timeout(120):
            while not all(o.done() for o in outputs):
                if rng.random() < 0.5:
                    os.truncate(file, 0)  # what `> file` or a rotation does
                else:
                    fd = os.open(file, os.O_WRONLY)
                    try:
                        os.pwrite(fd, bytes(4096), 0)  # zeroed in place
                    finally:
                        os.close(fd)
                cuts += 1
                await asyncio.sleep(rng.uniform(0.001, 0.01))
            results = [await o for o in outputs]
    finally:
        for p in procs:
            if p.returncode is None:
                end(p.pid)
                await p.wait()
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, f"a writer ended with {p.returncode}: {err.decode()[-2000:]}"
        assert json.loads(out.decode().splitlines()[-1])["committed"] == WRITES
    print(f"\nthe queue file was truncated or zeroed {cuts} times under {PROCESSES} writers")
    assert cuts >= 10
    by_pid = await committed(url)
    assert sorted(by_pid) == sorted(p.pid for p in procs)
    assert all(ns == [-1, *range(WRITES)] for ns in by_pid.values()), by_pid
    # The next write rebuilds the file, and the line goes on.
    async with serializer(url, coordination="advisory") as ser:
        await ser.run(insert, WRITES)
    assert queue_path(path).read_bytes()[:8] == b"wtqueue1"


# -- 2. a process forks, and is killed while it holds a ticket ---------------------------


async def test_a_forked_child_does_not_keep_a_killed_parents_place(tmp_path: Path) -> None:
    """A child that inherits the parent's slot file must not keep its place alive.

    Before, the child held the flock of the parent's slot, so the ticket of the
    killed parent counted as alive and every write of the others waited the
    whole patience (busy timeout + 1 s): 4 writes, 4 patiences."""
    path = tmp_path / "f.db"
    url = f"sqlite:///{path}"
    await create_table(url)
    barrier = tmp_path / "go"
    # It starts the parent, and adopts the child once the parent is killed.
    launcher = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), "fork", url, str(barrier), stdout=subprocess.PIPE
    )
    parent = child = 0
    busy = 1.0
    patience = busy + _PATIENCE
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        assert launcher.stdout is not None
        async with asyncio.timeout(30):
            report = json.loads(await launcher.stdout.readline())
        parent, child = report["pid"], report["child"]
        holder.execute("BEGIN IMMEDIATE")  # the parent's next write waits for this lock
        barrier.touch()
        # In line, with a ticket, in BEGIN's wait for the lock:
        await asyncio.to_thread(wait_until, lambda: any(tickets(path)))
        os.kill(parent, signal.SIGKILL)
        await asyncio.to_thread(wait_until, lambda: not alive(parent))
        holder.rollback()
        assert alive(child)  # it lives on, with the parent's descriptors if it kept them
        async with serializer(url, coordination="advisory", sqlite_busy_timeout=busy) as ser:
            began = time.monotonic()
            for n in range(1, 5):
                await ser.run(insert, n)
            took = time.monotonic() - began
    finally:
        holder.close()
        for pid in (child, parent):
            if pid:
                end(pid)
        end(launcher.pid)
        await launcher.wait()
    print(f"\n4 writes took {took:.2f}s after a forked parent was killed in line")
    # The dead parent's ticket is dropped at once: no write waits a patience.
    assert took < patience
    by_pid = await committed(url)
    assert by_pid == {parent: [-1], os.getpid(): [1, 2, 3, 4]}


# -- 3. a process holding an earlier ticket is frozen -----------------------------------


async def test_a_frozen_holder_costs_one_patience_in_all(tmp_path: Path) -> None:
    """Behind a SIGSTOPped ticket holder, the others wait one patience, then pass it over.

    Before, every write waited the whole patience again: 4 writes, 4 patiences."""
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    await create_table(url)
    busy = 0.5
    patience = busy + _PATIENCE
    writes = 4
    async with serializer(url, coordination="advisory", sqlite_busy_timeout=busy) as ser:
        await ser.run(insert, -1)  # this process's place in the line
        other = await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER), "join", str(path), stdout=subprocess.PIPE
        )
        try:
            assert other.stdout is not None
            async with asyncio.timeout(30):
                ticket = int(await other.stdout.readline())
            os.kill(other.pid, signal.SIGSTOP)  # alive, holding an earlier ticket, never moving
            began = time.monotonic()
            async with asyncio.timeout(10 * writes * patience):
                for n in range(writes):
                    await ser.run(insert, n)
            took = time.monotonic() - began
            still = ticket in tickets(path)
        finally:
            end(other.pid)
            await other.wait()
    print(f"\n{writes} writes behind a frozen process took {took:.2f}s (patience {patience}s)")
    assert still  # it was in line all along: passed over, not dropped
    assert patience <= took < 2 * patience
    assert await committed(url) == {os.getpid(): [-1, *range(writes)]}


# -- 4. the queue file holds something else ---------------------------------------------


async def test_a_corrupt_counter_is_renumbered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A maximal counter in the header: before, the next write failed with struct.error."""
    path = tmp_path / "c.db"
    url = f"sqlite:///{path}"
    await create_table(url)
    async with serializer(url, coordination="advisory") as ser:
        await ser.run(insert, -1)
        fd = os.open(queue_path(path), os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack("<q", 2**63 - 1), 8)
        finally:
            os.close(fd)
        with caplog.at_level(logging.WARNING, logger="writeturn"):
            for n in range(3):
                await ser.run(insert, n)
    assert any("renumber" in r.getMessage() for r in caplog.records), caplog.text
    counter = HEADER.unpack_from(queue_path(path).read_bytes())[1]
    assert 0 < counter < 2**32
    assert await committed(url) == {os.getpid(): [-1, 0, 1, 2]}


async def test_a_foreign_queue_file_is_reported_and_writes_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue file is overwritten with other data while a serializer writes.

    Before, the next write failed with a raw struct.error. Now one warning says
    the file is not a queue file, and writes wait for SQLite's lock directly."""
    path = tmp_path / "x.db"
    url = f"sqlite:///{path}"
    await create_table(url)
    foreign = b"\xff" * 4096
    async with serializer(url, coordination="advisory") as ser:
        await ser.run(insert, -1)
        queue_path(path).write_bytes(foreign)
        with caplog.at_level(logging.WARNING, logger="writeturn"):
            for n in range(3):
                await ser.run(insert, n)
    warnings = [r.getMessage() for r in caplog.records if "not a writeturn queue" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert str(queue_path(path)) in warnings[0]
    assert queue_path(path).read_bytes() == foreign  # someone else's file: left alone
    assert await committed(url) == {os.getpid(): [-1, 0, 1, 2]}
