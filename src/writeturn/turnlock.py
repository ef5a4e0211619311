"""The in-process turn lock: one holder per key, fair turns among writers.

:class:`TurnLock` is the primitive the serializer is built on, and usable on
its own. Hand-over is direct: ``release`` gives the turn to the next entry
synchronously, so no task can barge in between, and a waiter cancelled after
it was handed the turn passes it on instead of losing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ._turnqueue import Entry, TurnQueue
from .errors import ConfigurationError, ReentrantWriteError

__all__ = ["TurnLock", "TurnLockStatistics", "KeyStatistics", "Waiter"]


class Waiter(Entry):
    """A queue entry that is told when its turn comes (see :meth:`TurnLock.enqueue`)."""

    __slots__ = ()

    def on_grant(self) -> None:
        """Called synchronously, once, when the turn is handed to this entry."""
        raise NotImplementedError


class _FutureWaiter(Waiter):
    """The waiter of a task blocked in :meth:`TurnLock.turn`."""

    __slots__ = ("future",)

    def __init__(self, writer: Hashable | None, future: asyncio.Future[None]) -> None:
        super().__init__(writer)
        self.future = future

    def on_grant(self) -> None:
        # The future may already be cancelled (its task was cancelled just
        # before the grant): the task then sees CancelledError and hands on.
        if not self.future.done():
            self.future.set_result(None)


class _KeyTurns:
    """The turn state of one key: who holds it and who waits."""

    __slots__ = ("queue", "holder", "holder_task")

    def __init__(self) -> None:
        self.queue: TurnQueue[Waiter] = TurnQueue()
        self.holder: Waiter | None = None
        self.holder_task: asyncio.Task[object] | None = None


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """A snapshot of one key: ``held`` (a turn is taken), ``holder`` (its
    writer), ``waiting`` (live waiters) and ``writers`` (the waiting writers
    in the order their turns come; ``None`` stands for an anonymous write)."""

    held: bool
    holder: Hashable | None
    waiting: int
    writers: tuple[Hashable | None, ...]


@dataclass(frozen=True, slots=True)
class TurnLockStatistics:
    """A snapshot of the whole lock: ``keys_held`` (keys with a holder) and
    ``waiting`` (live waiters over all keys)."""

    keys_held: int
    waiting: int


class TurnLock:
    """Per key, one turn at a time, handed round-robin among writers and FIFO within each.

    A writer that just had a turn goes behind every other waiting writer, so
    two writers that each queue a burst alternate A, B, A, B. Writes with
    ``writer=None`` each count as their own writer and run in arrival order.
    A task cancelled while waiting leaves the queue without disturbing the
    others; one cancelled just after it was handed the turn passes it on.

    Not thread-safe: use it from one event loop. Different keys are independent.

    Example::

        lock = TurnLock()
        async with lock.turn(key="account:42", writer="billing"):
            ...  # no other turn on "account:42" runs meanwhile
    """

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[Hashable, _KeyTurns] = {}

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<TurnLock keys_held={s.keys_held} waiting={s.waiting}>"

    @asynccontextmanager
    async def turn(self, key: Hashable, writer: Hashable | None = None) -> AsyncIterator[None]:
        """Wait for the turn on ``key`` as ``writer``, hold it for the block, then hand it on.

        Raises :class:`ReentrantWriteError` at once if the current task already
        holds ``key`` (waiting would deadlock).
        """
        await self.acquire(key, writer)
        try:
            yield
        finally:
            self.release(key)

    async def acquire(self, key: Hashable, writer: Hashable | None = None) -> None:
        """Wait for the turn on ``key``; the caller must :meth:`release` it.

        Cancellation while waiting withdraws the request (or, if the turn was
        already handed over, passes it on) and re-raises.
        """
        task = asyncio.current_task()
        turns = self._keys.get(key)
        if turns is not None and task is not None and turns.holder_task is task:
            raise ReentrantWriteError(
                f"this task already holds the turn on key {key!r}; waiting for it again would "
                "deadlock. Finish the outer turn first, or use a different key."
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _FutureWaiter(_check_writer(writer), future)
        if not self.enqueue(key, waiter):
            try:
                await future
            except BaseException:
                if not self.withdraw(key, waiter):
                    # The turn was handed to us as we were cancelled: pass it on.
                    self.release(key)
                raise
        self._keys[key].holder_task = task

    def release(self, key: Hashable) -> None:
        """End the current turn on ``key`` and hand it straight to the next waiter."""
        turns = self._keys.get(key)
        if turns is None or turns.holder is None:
            raise RuntimeError(f"release() of key {key!r}, whose turn is not held")
        turns.holder_task = None
        nxt = turns.queue.pop(after=turns.holder.writer)
        turns.holder = nxt
        if nxt is None:
            del self._keys[key]
        else:
            nxt.on_grant()

    # -- the synchronous core, for schedulers built on this lock ----------

    def enqueue(self, key: Hashable, waiter: Waiter) -> bool:
        """Place ``waiter`` in line for ``key``; return True if it holds the turn at once.

        If it has to wait, ``waiter.on_grant()`` is called when the turn comes,
        and from then on the caller owns the turn and must :meth:`release` it.
        """
        turns = self._keys.get(key)
        if turns is None:
            turns = self._keys[key] = _KeyTurns()
        if turns.holder is None:
            assert not len(turns.queue)
            turns.holder = waiter
            return True
        turns.queue.push(waiter)
        return False

    def claim(
        self, key: Hashable, limit: int, accept: Callable[[Waiter], bool] = lambda w: True
    ) -> list[Waiter]:
        """Take up to ``limit`` waiters that are next in line for ``key``, in turn order,
        for the current holder to serve within its own turn.

        Stops at the first waiter ``accept`` refuses, which keeps its place. The
        claimed waiters are not granted (``on_grant`` is not called): the
        caller serves them and releases the one turn when it is done.
        """
        turns = self._keys.get(key)
        assert turns is not None and turns.holder is not None, "claim() needs the turn held"
        claimed: list[Waiter] = []
        last = turns.holder.writer
        while len(claimed) < limit:
            nxt = turns.queue.peek(after=last)
            if nxt is None or not accept(nxt):
                break
            popped = turns.queue.pop(after=last)
            assert popped is nxt
            claimed.append(nxt)
            last = nxt.writer
        return claimed

    def withdraw(self, key: Hashable, waiter: Waiter) -> bool:
        """Take a waiting ``waiter`` out of line; False if it was already granted."""
        turns = self._keys.get(key)
        return turns is not None and turns.queue.withdraw(waiter)

    def waiting(self, key: Hashable) -> int:
        """How many live waiters ``key`` has (O(1))."""
        turns = self._keys.get(key)
        return 0 if turns is None else len(turns.queue)

    def waiters(self) -> list[Waiter]:
        """Every live waiter of every key, in no promised order (O(n))."""
        return [waiter for turns in self._keys.values() for waiter in turns.queue.entries()]

    def statistics(self) -> TurnLockStatistics:
        """Counts over all keys: keys whose turn is held, and live waiters."""
        return TurnLockStatistics(
            keys_held=sum(1 for t in self._keys.values() if t.holder is not None),
            waiting=sum(len(t.queue) for t in self._keys.values()),
        )

    def key_statistics(self, key: Hashable) -> KeyStatistics:
        """A snapshot of one key: holder, number waiting, and the turn order of writers."""
        turns = self._keys.get(key)
        if turns is None:
            return KeyStatistics(held=False, holder=None, waiting=0, writers=())
        return KeyStatistics(
            held=turns.holder is not None,
            holder=None if turns.holder is None else turns.holder.writer,
            waiting=len(turns.queue),
            writers=tuple(turns.queue.waiting_writers()),
        )


def _check_writer(writer: Hashable | None) -> Hashable | None:
    try:
        hash(writer)
    except TypeError:
        raise ConfigurationError(
            f"writer must be hashable (a name such as 'billing'), got {writer!r}"
        ) from None
    return writer
