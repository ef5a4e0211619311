"""Processes take SQLite's write lock in the order they asked: a ticket queue beside the file.

SQLite's write lock is not first-come-first-served across processes: a waiter
polls in its busy handler, sleeping longer each time, while the process that
just committed takes the lock again at once. One process then drains its
whole backlog while the others wait. Here, every serializer (in advisory
mode) that wants the lock first takes a ticket, waits until no live
participant holds an earlier one, and only then sends ``BEGIN IMMEDIATE``.
It gives its ticket back as soon as ``BEGIN IMMEDIATE`` returns (with the
lock, or with an error). A process that just committed therefore asks again
behind everyone already waiting, and the processes alternate.

The files, next to the database (like the migration lock):

* ``<database>.writeturn-queue``: a page every participant reads and writes
  with ``pread``/``pwrite`` (never a mapping: a file truncated under a
  mapping is SIGBUS at the next touch): a header (magic, ticket counter, the
  high-water mark of slots in use, written in one ``pwrite``) and one ticket
  per slot (0: not waiting). The counter is advanced under an exclusive
  ``flock`` on this file, held for a few microseconds; the tickets are read
  without a lock, all ``SLOTS`` of them whatever the high-water mark says
  (it is kept up for older versions, which scan only that far).
* ``<database>.writeturn-queue.<slot>``: slot ``<slot>``'s file. Its owner
  (one serializer) holds an exclusive ``flock`` on it for as long as it lives.
  The kernel drops that lock when the process dies, however it dies, so a
  ticket whose slot file is not locked belongs to nobody: it is skipped and
  cleared. A process killed while waiting or while holding the lock never
  leaves the queue stuck, and a recycled pid cannot fool it. ``flock``
  belongs to the open file description, which ``fork`` shares, so a forked
  child closes the descriptors it inherited (``os.register_at_fork``) and
  opens a place of its own at its first write; every file is opened
  close-on-exec.

A ticket is a fairness hint, never a lock: SQLite's own lock still excludes
writers, and nothing done to these files stops a write or raises from it:

* a file truncated or zeroed by someone else (a clean-up script, a log
  rotation) reads as zeros: the tickets it held are lost for that turn, and
  the next ``join`` rebuilds the header under the flock, its counter past
  every ticket still in line;
* a corrupt counter (negative, or past ``_LIMIT``) is renumbered from the
  tickets in line, with a warning; a corrupt ticket reads as none;
* a file that is not a queue file (neither our magic nor zeros) is reported
  once, and left alone: that participant's writes go to SQLite's lock
  directly from then on;
* a frozen process costs the others one ``patience``: a waiter whose line
  does not move for that long goes to SQLite's lock, and passes the places
  that held it still over for as long as they show the same ticket.

# Invariants:
# - only the owner of a slot sets its ticket; anyone may clear the ticket of a
#   slot whose file lock it took (its owner is gone);
# - the counter grows, and only under the flock on the queue file, so two
#   live tickets are never equal; the exceptions are the file's own damage: a
#   truncation (tickets lost with it) or a corrupt counter (renumbered past
#   every ticket still in line);
# - the high-water mark in the header never shrinks below a slot that holds
#   a ticket, and nothing here trusts it: every slot is read;
# - a participant holds at most one ticket, from join() until leave(), and
#   never one of a process it was forked from.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import struct
import weakref
from collections.abc import Callable
from pathlib import Path

__all__ = ["TicketQueue", "wait_turn", "SLOTS"]

log = logging.getLogger("writeturn")

#: Participants (serializers in advisory mode) one database file can line up at once.
SLOTS = 64

# The shared page: magic, counter, slots in use (the high-water mark), then the tickets.
_MAGIC = b"wtqueue1"
_HEADER = struct.Struct("<8sqq")
_TICKET = struct.Struct("<q")
# A counter at or past this is corrupt (2**62 tickets are never handed out): renumbered.
_LIMIT = 2**62
_PAGE = _HEADER.size + SLOTS * _TICKET.size  # what is read: the header and every ticket
_SIZE = 4096
assert _PAGE <= _SIZE

# Polling while earlier tickets wait: fast at first (a turn on SQLite lasts
# about a millisecond), slower while the line does not move.
_POLL_FIRST = 0.0005
_POLL_MAX = 0.005


def queue_path(database: Path) -> Path:
    """The queue file of the SQLite database file ``database``."""
    return database.with_name(f"{database.name}.writeturn-queue")


class TicketQueue:
    """One participant's view of a database file's ticket queue: join, see who is ahead, leave.

    Synchronous and non-blocking: every ``flock`` is a ``LOCK_NB`` attempt,
    so the event loop never waits on a file lock. Not safe for concurrent
    use by several tasks; a serializer passes one write at a time to
    ``BEGIN IMMEDIATE`` anyway.
    """

    __slots__ = (
        "path",
        "_fd",
        "_slot",
        "_others",
        "_fds",
        "_closer",
        "_last",
        "_passed",
        "_refused",
        "ticket",
        "__weakref__",
    )

    def __init__(self, database: str) -> None:
        """Open (or create) the queue of the database file ``database``.

        Blocking file I/O: call it in a thread. Raises ``OSError`` (and
        ``ImportError`` where there is no ``fcntl``) when there can be no queue.
        """
        import fcntl  # POSIX only; the dialect runs without the queue where this fails

        self.path = queue_path(Path(database).resolve())
        self._fd = _open(self.path)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # once, at creation: microseconds
            try:
                magic, _, _ = _HEADER.unpack_from(_read(self._fd), 0)
                if magic not in (_MAGIC, bytes(8)):
                    raise OSError(errno.EINVAL, f"{self.path} is not a writeturn queue file")
                if magic != _MAGIC or os.fstat(self._fd).st_size < _SIZE:
                    _rebuild(self._fd)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(self._fd)
            raise
        self._slot: int | None = None
        self._others: dict[int, int] = {}  # slot -> our descriptor of its file (liveness checks)
        # Every descriptor we opened: closing our slot's drops its flock (the slot is free).
        self._fds = [self._fd]
        self._closer = weakref.finalize(self, _close, self._fds)
        _OPEN.add(self)
        self._last = 0  # our latest ticket: a rebuilt counter starts past it
        # slot -> a ticket that held the line still for a whole patience: not
        # waited for again while that slot shows that same ticket.
        self._passed: dict[int, int] = {}
        self._refused = False  # the file turned out not to be a queue file: no line here
        #: Our ticket while we wait (0: none).
        self.ticket = 0

    def __repr__(self) -> str:
        return f"<TicketQueue {self.path.name} slot={self._slot} ticket={self.ticket}>"

    def close(self) -> None:
        """Leave for good: the slot becomes free for another participant."""
        self.leave()
        self._forget()  # no descriptor number kept that the process may reuse for another file
        self._closer()

    def _forget(self) -> None:
        """In a forked child: let go of the parent's descriptors, and with them its place.

        ``flock`` belongs to the open file description, which ``fork`` shares:
        a child that kept the parent's slot descriptor would keep the parent's
        place (and ticket) alive after the parent died. The child's first
        ``join`` opens the files again and takes a slot of its own.
        """
        _close(self._fds)
        self._fd = -1
        self._slot = None
        self._others = {}
        self.ticket = 0

    # -- the steps ----------------------------------------------------------------------

    def join(self) -> bool:
        """Take the next ticket; False if the queue file is locked this instant (try again).

        Raises ``OSError`` when every slot is taken by a live participant, or
        when the file is not a queue file. Rebuilds a truncated or zeroed file
        and renumbers a corrupt counter on the way.
        """
        import fcntl

        assert self.ticket == 0, "a participant holds one ticket at a time"
        if self._fd < 0:  # forked: this process's own place, opened at its first write
            self._fd = _open(self.path)
            self._fds.append(self._fd)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            page = _read(self._fd)
            magic, counter, used = _HEADER.unpack_from(page, 0)
            if magic not in (_MAGIC, bytes(8)):
                raise _NotAQueue(errno.EINVAL, f"{self.path} is not a writeturn queue file")
            if magic != _MAGIC or os.fstat(self._fd).st_size < _SIZE:
                # Truncated or zeroed under us (a clean-up script, a rotation): the
                # tickets it held are gone; the line goes on from what is left.
                log.warning("writeturn: %s was truncated or zeroed; rebuilt it", self.path)
                _rebuild(self._fd)
                page = _read(self._fd)
                magic, counter, used = _HEADER.unpack_from(page, 0)
            if self._slot is None:
                self._claim_slot()
            assert self._slot is not None
            tickets = _sane(_tickets(page))
            if not 0 <= counter < _LIMIT:
                renumbered = max(0, *tickets)
                log.warning(
                    "writeturn: the ticket counter of %s was corrupt (%d); renumbered it from %d",
                    self.path,
                    counter,
                    renumbered,
                )
                counter = renumbered
            # Past every ticket in line and our own last one: a rebuilt counter
            # does not put a newcomer before those already waiting.
            counter = max(counter, self._last, *tickets) + 1
            # The high-water mark (for older versions, which scan only that
            # far) never shrinks: every slot with a ticket stays below it.
            waiting = [slot + 1 for slot, t in enumerate(tickets) if t]
            used = max(used if 0 <= used <= SLOTS else SLOTS, self._slot + 1, *waiting)
            # One write: a reader never sees half a header.
            os.pwrite(self._fd, _HEADER.pack(_MAGIC, counter, used), 0)
            os.pwrite(self._fd, _TICKET.pack(counter), _slot_offset(self._slot))
            self.ticket = self._last = counter
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True

    def ahead(self) -> list[tuple[int, int]]:
        """The live tickets before ours, as (ticket, slot), earliest first."""
        mine = self.ticket
        if not mine:
            return []
        page = _read(self._fd)
        if _HEADER.unpack_from(page, 0)[0] not in (_MAGIC, bytes(8)):
            return []  # not a queue file (any more): nothing in it is a ticket
        # Every slot, whatever the header's high-water mark says: a torn or
        # corrupt header never hides a place in line (one read of 512 bytes).
        tickets = _sane(_tickets(page))
        for slot, t in list(self._passed.items()):
            if tickets[slot] != t:
                del self._passed[slot]  # it moved, or a new ticket came: it counts again
        earlier = [
            (t, slot)
            for slot, t in enumerate(tickets)
            if 0 < t < mine
            and slot != self._slot
            and self._passed.get(slot) != t
            and self._alive(slot)
        ]
        earlier.sort()
        return earlier

    def first(self) -> bool:
        """Join if not in line yet; True when no live participant holds an earlier ticket.

        Also True when there is no place in line (every slot is taken by a
        live participant, or the file is not a queue file): that write goes
        to SQLite's lock directly.
        """
        if self._refused:
            return True
        if not self.ticket:
            try:
                if not self.join():
                    return False  # the queue file is locked this instant: try again
            except _NotAQueue as exc:
                # Said once: from now on this participant does without the line.
                self._refused = True
                log.warning(
                    "writeturn: %s; processes writing this database no longer take turns "
                    "at SQLite's write lock here, each write waits for the lock directly",
                    exc.strerror,
                )
                return True
            except OSError as exc:
                log.warning("writeturn: cannot line up for SQLite's write lock: %s", exc)
                return True
        return not self.ahead()

    def pass_over(self, stalled: list[tuple[int, int]]) -> None:
        """Stop waiting for these (ticket, slot) places: they held the line still for a patience.

        Each stays passed over while its slot shows that ticket; a new ticket
        from the slot (its owner moved) counts again.
        """
        for t, slot in stalled:
            self._passed[slot] = t

    def leave(self) -> None:
        """Give the ticket back (one write into our own slot)."""
        if self.ticket and self._slot is not None:
            os.pwrite(self._fd, _TICKET.pack(0), _slot_offset(self._slot))
        self.ticket = 0

    # -- slots ----------------------------------------------------------------------------

    def _claim_slot(self) -> None:
        """Own the first slot whose file nobody holds (called under the queue file's lock)."""
        import fcntl

        for slot in range(SLOTS):
            fd = _open(Path(f"{self.path}.{slot}"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            # A ticket left by the slot's dead owner is void.
            os.pwrite(self._fd, _TICKET.pack(0), _slot_offset(slot))
            self._slot = slot
            self._fds.append(fd)
            return
        raise OSError(errno.EAGAIN, f"all {SLOTS} slots of {self.path} are held by live processes")

    def _alive(self, slot: int) -> bool:
        """Whether ``slot`` has a live owner; a dead owner's ticket is cleared."""
        import fcntl

        fd = self._others.get(slot)
        if fd is None:
            try:
                fd = _open(Path(f"{self.path}.{slot}"))
            except OSError:
                return True  # cannot tell: assume it lives (patience bounds the wait)
            self._others[slot] = fd
            self._fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        try:
            os.pwrite(self._fd, _TICKET.pack(0), _slot_offset(slot))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return False


def _open(path: Path) -> int:
    # Close-on-exec (a spawned program never holds a place); fork: see _forget().
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


# Every open queue of this process, for the forked child to let go of.
_OPEN: weakref.WeakSet[TicketQueue] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for queue in list(_OPEN):
        queue._forget()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _read(fd: int) -> bytes:
    """The header and the tickets, in one read; a short file reads as zeros past its end.

    Never a mapping: a file truncated under a mapping is SIGBUS at the next touch.
    """
    return os.pread(fd, _PAGE, 0).ljust(_PAGE, b"\0")


def _tickets(page: bytes) -> tuple[int, ...]:
    return struct.unpack_from(f"<{SLOTS}q", page, _HEADER.size)


def _rebuild(fd: int) -> None:
    """Give a new, truncated or zeroed queue file its size and header (under its flock)."""
    if os.fstat(fd).st_size < _SIZE:
        os.ftruncate(fd, _SIZE)
    page = _read(fd)
    magic, _, _ = _HEADER.unpack_from(page, 0)
    if magic != _MAGIC:
        os.pwrite(fd, _HEADER.pack(_MAGIC, max(0, *_sane(_tickets(page))), SLOTS), 0)


def _sane(tickets: tuple[int, ...]) -> tuple[int, ...]:
    """The tickets, with a corrupt one (negative, or past any counter) read as none."""
    return tuple(t if 0 < t < _LIMIT else 0 for t in tickets)


class _NotAQueue(OSError):
    """The queue file holds something else (its magic is neither ours nor zeros)."""


def _slot_offset(slot: int) -> int:
    return _HEADER.size + slot * _TICKET.size


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


async def wait_turn(
    queue: TicketQueue,
    *,
    deadline: float | None,
    patience: float,
    interrupted: Callable[[], bool],
) -> None:
    """Join ``queue`` and return once no live participant holds an earlier ticket.

    The caller must ``queue.leave()`` afterwards, whatever happens. The wait
    ends early with ``sqlite3.OperationalError``: "interrupted" when
    ``interrupted()`` turns true (the write was stopped), "database is locked"
    past ``deadline`` (event-loop time; SQLite's own busy wait says the same).
    If the line does not move for ``patience`` seconds (a frozen process
    holds the earliest ticket) it returns anyway, and SQLite's lock decides;
    the tickets that held it still are passed over from then on (until
    their slots show new ones), so a frozen process costs one patience, not
    one per write.
    """
    loop = asyncio.get_running_loop()
    started = since = loop.time()
    delay = _POLL_FIRST
    last: list[tuple[int, int]] | None = None
    while not queue.first():
        if interrupted():
            raise sqlite3.OperationalError("interrupted")
        now = loop.time()
        if deadline is not None and now >= deadline:
            raise sqlite3.OperationalError("database is locked")
        ahead = queue.ahead() if queue.ticket else [(0, -1)]  # (0, -1): the file was locked
        if ahead != last:  # somebody ahead got the lock or left: the line moves
            last, since, delay = ahead, now, _POLL_FIRST
        elif now - since >= patience:
            log.info(
                "writeturn: the line for SQLite's write lock did not move for %.1fs "
                "(waited %.1fs in all); going to the lock directly, and passing over "
                "the places that held it still (slots %s) until they move",
                now - since,
                now - started,
                sorted(slot for _, slot in ahead if slot >= 0),
            )
            if queue.ticket:
                queue.pass_over(ahead)
            return
        pause = delay if deadline is None else min(delay, max(0.0, deadline - now))
        await asyncio.sleep(pause)
        delay = min(delay * 2, _POLL_MAX)
