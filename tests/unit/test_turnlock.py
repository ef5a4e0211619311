"""TurnLock with real tasks: turn order, hand-over, cancellation, statistics.

Every wait is bounded, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import pytest

from writeturn.errors import ConfigurationError, ReentrantWriteError, WriteturnError
from writeturn.turnlock import KeyStatistics, TurnLock, TurnLockStatistics, Waiter

BOUND = 5.0  # seconds; far above what any test here needs


async def until(cond: Callable[[], bool], what: str, limit: int = 10_000) -> None:
    """Let other tasks run until ``cond()`` holds; fail (not hang) if it never does."""
    for _ in range(limit):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


async def queue_waiters(
    lock: TurnLock,
    key: Hashable,
    specs: Sequence[tuple[Hashable | None, str]],
    order: list[str],
    release_gate: asyncio.Event | None = None,
) -> list[asyncio.Task[None]]:
    """Start one task per (writer, name), each queued on ``key`` before the next starts.

    Each task records its name when it gets the turn, optionally waits for
    ``release_gate``, then releases.
    """

    async def one(writer: Hashable | None, name: str) -> None:
        async with lock.turn(key, writer):
            order.append(name)
            if release_gate is not None:
                await release_gate.wait()

    tasks: list[asyncio.Task[None]] = []
    for writer, name in specs:
        want = lock.key_statistics(key).waiting + 1
        tasks.append(asyncio.create_task(one(writer, name), name=name))

        def queued(want: int = want) -> bool:
            return lock.key_statistics(key).waiting == want

        await until(queued, f"{name} queued")
    return tasks


async def finish(tasks: list[asyncio.Task[None]]) -> None:
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*tasks)


# -- order ------------------------------------------------------------------------------


async def test_two_bursts_alternate_after_release() -> None:
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k", "holder")
    tasks = await queue_waiters(
        lock,
        "k",
        [("A", f"a{i}") for i in range(5)] + [("B", f"b{i}") for i in range(5)],
        order,
    )
    assert order == []  # nobody barged past the holder
    assert lock.key_statistics("k") == KeyStatistics(
        held=True, holder="holder", waiting=10, writers=("A", "B")
    )
    lock.release("k")
    await finish(tasks)
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


async def test_a_a_b_c_a_order() -> None:
    # Ring [A, B, C]: a1, then A goes to the back -> b1, c1 -> a2, a3.
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k")
    specs = [("A", "a1"), ("A", "a2"), ("B", "b1"), ("C", "c1"), ("A", "a3")]
    tasks = await queue_waiters(lock, "k", specs, order)
    lock.release("k")
    await finish(tasks)
    assert order == ["a1", "b1", "c1", "a2", "a3"]


async def test_fifo_within_a_writer() -> None:
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k", "A")
    tasks = await queue_waiters(lock, "k", [("A", f"a{i}") for i in range(8)], order)
    lock.release("k")
    await finish(tasks)
    assert order == [f"a{i}" for i in range(8)]


async def test_anonymous_writers_run_in_arrival_order() -> None:
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k")
    tasks = await queue_waiters(lock, "k", [(None, f"n{i}") for i in range(8)], order)
    assert lock.key_statistics("k").writers == (None,) * 8
    lock.release("k")
    await finish(tasks)
    assert order == [f"n{i}" for i in range(8)]


async def test_anonymous_and_named_writers_interleave() -> None:
    # Ring [A, n1, B, n2] with A holding a1, a2, a3.
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k")
    specs = [("A", "a1"), ("A", "a2"), (None, "n1"), ("B", "b1"), (None, "n2"), ("A", "a3")]
    tasks = await queue_waiters(lock, "k", specs, order)
    lock.release("k")
    await finish(tasks)
    assert order == ["a1", "n1", "b1", "n2", "a2", "a3"]


async def test_no_barging_past_a_direct_hand_over() -> None:
    # When the holder releases, the turn belongs to the first waiter at once: a caller
    # that asks for the key right after (before that waiter even ran) queues behind it.
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k", "A")
    tasks = await queue_waiters(lock, "k", [("B", "b1")], order)
    lock.release("k")
    assert lock.key_statistics("k").holder == "B"
    assert order == []  # b1 has not run yet
    async with asyncio.timeout(BOUND):
        await lock.acquire("k", "C")  # from this task, with no yield since the release
    order.append("c1")
    assert lock.key_statistics("k").holder == "C"
    lock.release("k")
    await finish(tasks)
    assert order == ["b1", "c1"]


async def test_different_keys_are_independent() -> None:
    lock = TurnLock()
    held = asyncio.Event()
    done = asyncio.Event()

    async def hold_k1() -> None:
        async with lock.turn("k1", "A"):
            held.set()
            await done.wait()

    holder = asyncio.create_task(hold_k1())
    async with asyncio.timeout(BOUND):
        await held.wait()
    # k2 is free although k1 is held (even by the same writer).
    async with asyncio.timeout(BOUND):
        async with lock.turn("k2", "A"):
            assert lock.statistics() == TurnLockStatistics(keys_held=2, waiting=0)
            assert lock.key_statistics("k2").holder == "A"
    assert lock.key_statistics("k1").held
    assert not lock.key_statistics("k2").held
    done.set()
    async with asyncio.timeout(BOUND):
        await holder
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


# -- cancellation ----------------------------------------------------------------------


async def test_waiter_cancelled_just_after_grant_passes_the_turn_on() -> None:
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k", "H")
    tasks = await queue_waiters(lock, "k", [("W", "w"), ("X", "x")], order)
    w_task, x_task = tasks
    lock.release("k")
    # The turn was handed to W synchronously: W's future is done, W has not run yet.
    assert lock.key_statistics("k") == KeyStatistics(
        held=True, holder="W", waiting=1, writers=("X",)
    )
    assert not w_task.done()
    w_task.cancel()
    async with asyncio.timeout(BOUND):
        with pytest.raises(asyncio.CancelledError):
            await w_task
        await x_task  # X must get the turn: no lost wake-up
    assert order == ["x"]
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


async def test_waiter_cancelled_just_before_grant_passes_the_turn_on() -> None:
    # W is cancelled while still queued, and the holder releases before W's task
    # ran its cancellation: the turn goes to W (whose future is already cancelled),
    # and W must hand it on to X.
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k", "H")
    w_task, x_task = await queue_waiters(lock, "k", [("W", "w"), ("X", "x")], order)
    w_task.cancel()
    lock.release("k")
    async with asyncio.timeout(BOUND):
        with pytest.raises(asyncio.CancelledError):
            await w_task
        await x_task
    assert order == ["x"]
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


async def test_granted_waiter_cancelled_with_nobody_behind_frees_the_key() -> None:
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k", "H")
    (w_task,) = await queue_waiters(lock, "k", [("W", "w")], order)
    lock.release("k")
    w_task.cancel()
    async with asyncio.timeout(BOUND):
        with pytest.raises(asyncio.CancelledError):
            await w_task
    assert order == []
    assert lock.key_statistics("k") == KeyStatistics(held=False, holder=None, waiting=0, writers=())
    # And the key is usable again at once.
    async with asyncio.timeout(BOUND):
        async with lock.turn("k", "Z"):
            assert lock.key_statistics("k").holder == "Z"


async def test_cancel_while_waiting_withdraws_without_disturbing_order() -> None:
    # Queued: a1, b1, a2, c1 -> ring [A, B, C]. b1 is cancelled, B leaves the ring.
    # Then: a1 -> ring [C, A]; c1 -> [A]; a2.
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k", "H")
    specs = [("A", "a1"), ("B", "b1"), ("A", "a2"), ("C", "c1")]
    a1, b1, a2, c1 = await queue_waiters(lock, "k", specs, order)
    b1.cancel()
    async with asyncio.timeout(BOUND):
        with pytest.raises(asyncio.CancelledError):
            await b1
    assert lock.key_statistics("k") == KeyStatistics(
        held=True, holder="H", waiting=3, writers=("A", "C")
    )
    lock.release("k")
    await finish([a1, a2, c1])
    assert order == ["a1", "c1", "a2"]


async def test_timeout_while_waiting_withdraws() -> None:
    lock = TurnLock()
    await lock.acquire("k", "H")

    async def impatient() -> None:
        async with asyncio.timeout(0.01):
            await lock.acquire("k", "W")

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(BOUND):
            await asyncio.create_task(impatient())
    assert lock.key_statistics("k") == KeyStatistics(held=True, holder="H", waiting=0, writers=())
    lock.release("k")
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


async def test_cancel_inside_the_turn_releases_it() -> None:
    lock = TurnLock()
    entered = asyncio.Event()
    order: list[str] = []

    async def hold() -> None:
        async with lock.turn("k", "A"):
            entered.set()
            await asyncio.Event().wait()  # forever, until cancelled

    holder = asyncio.create_task(hold())
    async with asyncio.timeout(BOUND):
        await entered.wait()
    (b,) = await queue_waiters(lock, "k", [("B", "b1")], order)
    holder.cancel()
    async with asyncio.timeout(BOUND):
        with pytest.raises(asyncio.CancelledError):
            await holder
        await b
    assert order == ["b1"]
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


class CountingLock(TurnLock):
    """Counts withdrawals that found the waiter already granted (the pass-it-on path)."""

    __slots__ = ("late_withdrawals",)

    def __init__(self) -> None:
        super().__init__()
        self.late_withdrawals = 0

    def withdraw(self, key: Hashable, waiter: Waiter) -> bool:
        withdrawn = super().withdraw(key, waiter)
        if not withdrawn:
            self.late_withdrawals += 1
        return withdrawn


async def test_many_acquisitions_with_random_cancellation() -> None:
    rng = random.Random(20240611)
    lock = CountingLock()
    keys = ["k0", "k1", "k2"]
    writers: list[Hashable | None] = ["w0", "w1", "w2", "w3", "w4", None]
    n_workers, per_worker = 50, 200  # 10,000 acquisitions
    inside: dict[str, int] = defaultdict(int)
    max_inside: dict[str, int] = defaultdict(int)
    seq = 0
    # Per (key, writer): the enqueue sequence numbers in grant order. Within one named
    # writer on one key they must rise (FIFO); likewise among anonymous writes on a key.
    grants: dict[tuple[str, Hashable | None], list[int]] = defaultdict(list)
    completed = cancelled = 0

    async def critical(key: str, writer: Hashable | None, work: int) -> str:
        nonlocal seq
        seq += 1
        my_seq = seq
        # acquire() enqueues before its first suspension, so my_seq is the enqueue order.
        async with lock.turn(key, writer):
            grants[key, writer].append(my_seq)
            inside[key] += 1
            max_inside[key] = max(max_inside[key], inside[key])
            try:
                for _ in range(work):
                    await asyncio.sleep(0)
                    assert inside[key] == 1
            finally:
                inside[key] -= 1
        return "ok"

    async def canceller(task: asyncio.Task[str], delay: int) -> None:
        for _ in range(delay):
            await asyncio.sleep(0)
        task.cancel()

    async def worker() -> None:
        nonlocal completed, cancelled
        for _ in range(per_worker):
            key = rng.choice(keys)
            writer = rng.choice(writers)
            t = asyncio.create_task(critical(key, writer, rng.randrange(3)))
            killer = None
            if rng.random() < 0.25:
                killer = asyncio.create_task(canceller(t, rng.randrange(8)))
            try:
                result = await t
            except asyncio.CancelledError:
                # Only a task we chose to cancel may end cancelled.
                assert killer is not None
                assert t.cancelled()
                cancelled += 1
            else:
                assert result == "ok"
                completed += 1
            if killer is not None:
                await killer

    async with asyncio.timeout(20):
        await asyncio.gather(*(worker() for _ in range(n_workers)))

    assert completed + cancelled == n_workers * per_worker
    assert cancelled > 500 and completed > 5000  # the mix did both
    assert lock.late_withdrawals > 10  # cancellations did land between grant and wake-up
    assert all(v == 1 for v in max_inside.values()) and set(max_inside) == set(keys)
    assert all(v == 0 for v in inside.values())
    for (key, writer), seqs in grants.items():
        assert seqs == sorted(seqs), (key, writer)
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)
    for key in keys:
        assert lock.key_statistics(key) == KeyStatistics(
            held=False, holder=None, waiting=0, writers=()
        )
    assert repr(lock) == "<TurnLock keys_held=0 waiting=0>"


# -- misuse --------------------------------------------------------------------------


async def test_reentering_a_held_key_raises_and_leaves_the_turn_alone() -> None:
    lock = TurnLock()
    async with lock.turn("k", "A"):
        with pytest.raises(ReentrantWriteError) as info:
            async with asyncio.timeout(BOUND):
                await lock.acquire("k", "A")
        assert isinstance(info.value, WriteturnError)
        assert "'k'" in str(info.value)
        with pytest.raises(ReentrantWriteError):
            async with asyncio.timeout(BOUND):
                async with lock.turn("k", "other writer"):
                    pass
        # Nothing was queued, and the outer turn is still ours.
        assert lock.key_statistics("k") == KeyStatistics(
            held=True, holder="A", waiting=0, writers=()
        )
        # A different key from the same task is fine.
        async with asyncio.timeout(BOUND):
            async with lock.turn("k2", "A"):
                assert lock.statistics().keys_held == 2
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


async def test_reentry_check_applies_after_waiting_for_the_turn() -> None:
    # The task got the turn by waiting (not at once): re-entry must still be refused.
    lock = TurnLock()
    result: list[str] = []
    await lock.acquire("k", "H")

    async def waiter() -> None:
        async with lock.turn("k", "W"):
            try:
                await lock.acquire("k", "W")
            except ReentrantWriteError:
                result.append("refused")

    t = asyncio.create_task(waiter())
    await until(lambda: lock.key_statistics("k").waiting == 1, "waiter queued")
    lock.release("k")
    await finish([t])
    assert result == ["refused"]


async def test_a_different_task_waits_for_the_key_instead_of_raising() -> None:
    lock = TurnLock()
    order: list[str] = []
    await lock.acquire("k", "A")
    (t,) = await queue_waiters(lock, "k", [("A", "other task")], order)
    assert not t.done() and order == []
    lock.release("k")
    await finish([t])
    assert order == ["other task"]


async def test_release_of_an_unheld_key_raises() -> None:
    lock = TurnLock()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release("never")
    await lock.acquire("k")
    lock.release("k")
    with pytest.raises(RuntimeError, match="not held"):
        lock.release("k")
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


async def test_unhashable_writer_is_refused() -> None:
    lock = TurnLock()
    with pytest.raises(ConfigurationError):
        await lock.acquire("k", ["not", "hashable"])  # type: ignore[arg-type]
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


# -- statistics and repr ------------------------------------------------------------


async def test_statistics_mid_run_and_repr() -> None:
    lock = TurnLock()
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)
    assert lock.key_statistics("k") == KeyStatistics(held=False, holder=None, waiting=0, writers=())
    assert repr(lock) == "<TurnLock keys_held=0 waiting=0>"

    order: list[str] = []
    gate = asyncio.Event()
    await lock.acquire("k", "H")
    await lock.acquire("other", None)
    specs = [("B", "b1"), (None, "n1"), ("A", "a1"), ("B", "b2"), ("C", "c1")]
    tasks = await queue_waiters(lock, "k", specs, order, release_gate=gate)
    (o1,) = await queue_waiters(lock, "other", [("Z", "z1")], order, release_gate=gate)

    assert lock.key_statistics("k") == KeyStatistics(
        held=True, holder="H", waiting=5, writers=("B", None, "A", "C")
    )
    assert lock.key_statistics("other") == KeyStatistics(
        held=True, holder=None, waiting=1, writers=("Z",)
    )
    assert lock.statistics() == TurnLockStatistics(keys_held=2, waiting=6)
    assert repr(lock) == "<TurnLock keys_held=2 waiting=6>"

    # Hand "k" to b1 (it then waits on the gate inside its turn): B goes to the back.
    lock.release("k")
    await until(lambda: order == ["b1"], "b1 runs")
    assert lock.key_statistics("k") == KeyStatistics(
        held=True, holder="B", waiting=4, writers=(None, "A", "C", "B")
    )
    assert lock.statistics() == TurnLockStatistics(keys_held=2, waiting=5)
    assert repr(lock) == "<TurnLock keys_held=2 waiting=5>"

    lock.release("other")
    gate.set()
    await finish([*tasks, o1])
    assert order == ["b1", "z1", "n1", "a1", "c1", "b2"]
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)
    assert repr(lock) == "<TurnLock keys_held=0 waiting=0>"


# -- the synchronous core ----------------------------------------------------------


class RecordingWaiter(Waiter):
    __slots__ = ("name", "log")

    def __init__(self, writer: Hashable | None, name: str, log: list[str]) -> None:
        super().__init__(writer)
        self.name = name
        self.log = log

    def on_grant(self) -> None:
        self.log.append(self.name)


def test_enqueue_and_withdraw_core_grants_synchronously() -> None:
    lock = TurnLock()
    log: list[str] = []
    first = RecordingWaiter("A", "a1", log)
    assert lock.enqueue("k", first) is True  # free key: held at once, on_grant not called
    assert log == []
    w = {
        n: RecordingWaiter(wr, n, log)
        for wr, n in [("A", "a2"), ("B", "b1"), ("A", "a3"), (None, "n1")]
    }
    for waiter in w.values():
        assert lock.enqueue("k", waiter) is False
    assert lock.withdraw("k", w["b1"]) is True
    assert lock.withdraw("k", w["b1"]) is False
    assert lock.withdraw("missing", w["a2"]) is False
    assert lock.key_statistics("k").writers == ("A", None)
    # a1's writer A is passed over while another writer waits: n1 goes first.
    lock.release("k")  # n1 granted synchronously
    assert log == ["n1"]
    assert lock.withdraw("k", w["n1"]) is False  # already granted
    lock.release("k")
    lock.release("k")
    assert log == ["n1", "a2", "a3"]
    lock.release("k")
    assert lock.statistics() == TurnLockStatistics(keys_held=0, waiting=0)


async def test_a_writer_granted_at_once_still_alternates_with_later_writers() -> None:
    """Regression: A's first write took the free key without queueing, A's next one
    queued before B's, and A used to get the second turn too (AABABB)."""
    lock, order = TurnLock(), []

    async def write(name: str) -> None:
        async with lock.turn("k", writer=name):
            order.append(name)
            await asyncio.sleep(0)

    await asyncio.gather(*(asyncio.create_task(write(n)) for n in "AB" for _ in range(3)))
    assert "".join(order) == "ABABAB"
