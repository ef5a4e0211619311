"""The ticket queue beside a SQLite file: first come, first served, and dead places dropped.

Each ``TicketQueue`` opens the files on its own, so several in one process are
as separate as processes are: ``flock`` excludes open file descriptions, not
processes. A participant's death is its descriptors closing, which is what
the kernel does to a killed process (the integration tests kill real ones).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import struct
from pathlib import Path

import pytest

from writeturn._sqlite_queue import SLOTS, TicketQueue, queue_path, wait_turn


def open_queues(tmp_path: Path, n: int) -> list[TicketQueue]:
    return [TicketQueue(str(tmp_path / "app.db")) for _ in range(n)]


def ahead_of(q: TicketQueue, queues: list[TicketQueue]) -> list[int]:
    """Who is ahead of ``q``, as indexes into ``queues``."""
    by_ticket = {other.ticket: i for i, other in enumerate(queues) if other.ticket}
    return [by_ticket[t] for t, _ in q.ahead()]


def test_first_come_first_served(tmp_path: Path) -> None:
    qs = open_queues(tmp_path, 4)
    for q in (qs[2], qs[0], qs[3], qs[1]):
        assert q.join()
    assert ahead_of(qs[2], qs) == []
    assert ahead_of(qs[1], qs) == [2, 0, 3]
    qs[0].leave()
    assert ahead_of(qs[1], qs) == [2, 3]
    # Leaving and joining again goes to the back of the line.
    qs[2].leave()
    assert qs[2].join()
    assert ahead_of(qs[2], qs) == [3, 1]
    assert ahead_of(qs[3], qs) == []
    for q in qs:
        q.close()


def test_randomized_line_is_fifo(tmp_path: Path) -> None:
    rng = random.Random(15)
    qs = open_queues(tmp_path, 8)
    line: list[int] = []  # the model: indexes in join order
    for _ in range(500):
        i = rng.randrange(len(qs))
        if qs[i].ticket:
            qs[i].leave()
            line.remove(i)
        else:
            assert qs[i].join()
            line.append(i)
        for j in line:
            assert ahead_of(qs[j], qs) == line[: line.index(j)]
    for q in qs:
        q.close()


def test_a_dead_participant_is_skipped_and_its_slot_reused(tmp_path: Path) -> None:
    first, second, third = open_queues(tmp_path, 3)
    for q in (first, second, third):
        assert q.join()
    first._closer()  # what the kernel does when the process dies: its flock goes
    assert [t for t, _ in third.ahead()] == [second.ticket]
    # Its ticket was cleared, and a newcomer takes the free slot.
    newcomer = TicketQueue(str(tmp_path / "app.db"))
    assert newcomer.join()
    assert sorted(s for _, s in newcomer.ahead()) == [1, 2]
    for q in (second, third, newcomer):
        q.close()


def test_a_closed_participant_frees_its_slot(tmp_path: Path) -> None:
    for _ in range(3 * SLOTS):  # more than the slots: closing gives them back
        q = TicketQueue(str(tmp_path / "app.db"))
        assert q.join()
        q.close()
    # The queue file and one slot file: no file per participant ever seen.
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["app.db.writeturn-queue", "app.db.writeturn-queue.0"]


def test_a_forked_child_takes_a_place_of_its_own(tmp_path: Path) -> None:
    """The child lets go of the parent's descriptors (and place) and joins on its own.

    It must: flock belongs to the open file description, which fork shares, so
    a child that kept the parent's slot descriptor would keep the parent's
    ticket alive after the parent died."""
    parent = TicketQueue(str(tmp_path / "app.db"))
    assert parent.join()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(read)
            clean = parent.ticket == 0 and not parent.ahead()
            assert parent.join()
            os.write(write, f"{clean} {parent._slot} {parent.ticket}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = pipe.read().split()
    assert os.waitpid(pid, 0)[1] == 0, "the child failed"
    assert report == ["True", "1", str(parent.ticket + 1)]
    # The child is gone and its slot with it; the parent's is still held.
    newcomer = TicketQueue(str(tmp_path / "app.db"))
    assert newcomer.join()
    assert newcomer.ahead() == [(parent.ticket, 0)]
    for q in (parent, newcomer):
        q.close()


def test_every_slot_taken(tmp_path: Path) -> None:
    qs = open_queues(tmp_path, SLOTS)
    for q in qs:
        assert q.join()
    extra = TicketQueue(str(tmp_path / "app.db"))
    with pytest.raises(OSError, match="slots"):
        extra.join()
    for q in [*qs, extra]:
        q.close()


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    queue_path(tmp_path / "app.db").write_bytes(b"not a queue" * 10)
    with pytest.raises(OSError, match="not a writeturn queue"):
        TicketQueue(str(tmp_path / "app.db"))


def poke(tmp_path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into the queue file at ``offset``, as a stray program would."""
    fd = os.open(queue_path(tmp_path / "app.db"), os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def header(tmp_path: Path) -> tuple[bytes, int, int]:
    magic, counter, used = struct.unpack_from("<8sqq", queue_path(tmp_path / "app.db").read_bytes())
    return magic, counter, used


def test_a_zeroed_file_is_rebuilt_and_the_line_goes_on(tmp_path: Path) -> None:
    waiting, newcomer = open_queues(tmp_path, 2)
    assert waiting.join()
    before = waiting.ticket
    waiting.leave()
    poke(tmp_path, 0, bytes(4096))
    assert newcomer.join() and waiting.join()
    assert header(tmp_path)[0] == b"wtqueue1"
    # A participant's tickets only grow, and the line keeps its order.
    assert newcomer.ticket < waiting.ticket and before < waiting.ticket
    assert ahead_of(waiting, [waiting, newcomer]) == [1]
    for q in (waiting, newcomer):
        q.close()


def test_a_corrupt_counter_is_renumbered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, second = open_queues(tmp_path, 2)
    assert first.join()
    poke(tmp_path, 8, struct.pack("<q", 2**63 - 1))
    with caplog.at_level(logging.WARNING, logger="writeturn"):
        assert second.join()  # before: struct.error
    assert "renumbered" in caplog.text
    assert first.ticket < second.ticket < 2**32
    assert ahead_of(second, [first, second]) == [0]
    for q in (first, second):
        q.close()


def test_a_torn_header_never_hides_a_place_in_line(tmp_path: Path) -> None:
    """The count of slots in use read as 0 (a half-written header) switched the line off."""
    qs = open_queues(tmp_path, 3)
    for q in qs:
        assert q.join()
    poke(tmp_path, 16, struct.pack("<q", 0))
    assert ahead_of(qs[2], qs) == [0, 1]
    assert not qs[2].first()
    # The next join writes the mark back: at least every slot with a ticket.
    qs[0].leave()
    assert qs[0].join()
    assert header(tmp_path)[2] >= 3
    for q in qs:
        q.close()


def test_a_file_that_becomes_foreign_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q = TicketQueue(str(tmp_path / "app.db"))
    assert q.join()
    q.leave()
    poke(tmp_path, 0, b"\xff" * 4096)
    with caplog.at_level(logging.WARNING, logger="writeturn"):
        for _ in range(3):
            assert q.first()  # before: struct.error; now: no line, SQLite's lock decides
            q.leave()
    reports = [r for r in caplog.records if "not a writeturn queue file" in r.getMessage()]
    assert len(reports) == 1, caplog.text
    assert queue_path(tmp_path / "app.db").read_bytes() == b"\xff" * 4096  # left alone
    q.close()


async def test_wait_turn_ends_on_interrupt_and_at_the_deadline(tmp_path: Path) -> None:
    front, me = open_queues(tmp_path, 2)
    assert front.join()
    stop = False
    waiting = asyncio.ensure_future(
        wait_turn(me, deadline=None, patience=60, interrupted=lambda: stop)
    )
    await asyncio.sleep(0.05)
    assert not waiting.done() and me.ticket > front.ticket
    stop = True
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        await asyncio.wait_for(waiting, 5)
    me.leave()
    loop = asyncio.get_running_loop()
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        await asyncio.wait_for(
            wait_turn(me, deadline=loop.time() + 0.05, patience=60, interrupted=lambda: False),
            5,
        )
    me.leave()
    # Once the one in front leaves, the turn comes.
    front.leave()
    await asyncio.wait_for(wait_turn(me, deadline=None, patience=60, interrupted=lambda: False), 5)
    me.leave()
    for q in (front, me):
        q.close()


async def test_wait_turn_stops_waiting_for_a_line_that_does_not_move(tmp_path: Path) -> None:
    front, me = open_queues(tmp_path, 2)
    assert front.join()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(wait_turn(me, deadline=None, patience=0.2, interrupted=lambda: False), 5)
    assert loop.time() - began >= 0.2
    assert me.ticket > front.ticket  # it kept its ticket: the caller leaves after BEGIN
    me.leave()
    for q in (front, me):
        q.close()


async def test_a_frozen_place_is_passed_over_until_it_takes_a_new_ticket(
    tmp_path: Path,
) -> None:
    front, me = open_queues(tmp_path, 2)
    assert front.join()  # and never moves: frozen
    await asyncio.wait_for(wait_turn(me, deadline=None, patience=0.2, interrupted=lambda: False), 5)
    me.leave()
    # The same ticket in the same slot: not waited for again.
    for _ in range(3):
        assert me.first()
        me.leave()
    # Its owner moves (a new ticket from that slot): it counts again.
    front.leave()
    assert front.join()
    assert not me.first()
    assert ahead_of(me, [front, me]) == [0]
    for q in (front, me):
        q.close()


async def test_wait_turn_goes_ahead_when_every_slot_is_taken(tmp_path: Path) -> None:
    qs = open_queues(tmp_path, SLOTS)
    for q in qs:
        assert q.join()
    extra = TicketQueue(str(tmp_path / "app.db"))
    await asyncio.wait_for(
        wait_turn(extra, deadline=None, patience=60, interrupted=lambda: False), 5
    )
    assert extra.ticket == 0  # no place in line, but no failure either
    for q in [*qs, extra]:
        q.close()
