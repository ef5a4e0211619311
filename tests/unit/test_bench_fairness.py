"""The bench's fairness figure: the longest run of turns one writer kept on a key
while another writer waited for that key."""

from __future__ import annotations

from writeturn.tools.bench._cell import Record, fairness_run
from writeturn.tools.bench._workloads import Op


def commits(*writes: tuple[int, str, float, float]) -> list[Record]:
    """(writer, key, submitted, done) per write, all committed."""
    return [
        Record(Op(wid, writer, key), submitted=sub, done=done, state="ok")
        for wid, (writer, key, sub, done) in enumerate(writes)
    ]


def test_strict_alternation_is_one() -> None:
    # Writers 0 and 1 each queue 3 writes at t=0; the turns alternate 0, 1, 0, 1, 0, 1.
    writes = [(w, "k", 0.0, 1.0 + 2 * i + w) for i in range(3) for w in (0, 1)]
    assert fairness_run(commits(*writes)) == 1


def test_a_fifo_burst_is_its_length() -> None:
    # Writer 0's burst of 4 runs first while writer 1's write waits.
    writes = [(0, "k", 0.0, float(i + 1)) for i in range(4)] + [(1, "k", 0.0, 5.0)]
    assert fairness_run(commits(*writes)) == 4


def test_turns_on_different_keys_keep_nobody_waiting() -> None:
    # Writer 0 commits once on each of four keys in a row; writer 1 waits only on
    # k3 and gets it next. Measured across keys this would look like a run of 4.
    writes = [(0, f"k{i}", 0.0, float(i + 1)) for i in range(4)] + [(1, "k3", 0.0, 5.0)]
    assert fairness_run(commits(*writes)) == 1


def test_nobody_waiting_is_zero() -> None:
    writes = [(0, "k", float(i), float(i) + 0.5) for i in range(5)]
    assert fairness_run(commits(*writes)) == 0
    assert fairness_run([]) == 0
