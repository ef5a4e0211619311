"""SerializerStats reads in milliseconds, and the counters tell their observers each sample."""

from __future__ import annotations

import logging

import pytest

from writeturn import SerializerStats
from writeturn.stats import Counters


def test_repr_shows_durations_in_milliseconds() -> None:
    counters = Counters()
    for seconds in (3.67e-05, 0.0012, 2.5):
        counters.waits.append(seconds)
    counters.holds.append(0.0042)
    text = repr(counters.snapshot(queued=2, running=1))
    assert text.startswith("SerializerStats(committed=0, rolled_back=0, withdrawn=0, unknown=0, ")
    assert "queued=2, running=1" in text
    assert "wait_p50=1.2 ms" in text and "wait_p99=2,500 ms" in text
    assert "hold_p50=4.2 ms" in text
    assert "e-05" not in text and "e+" not in text
    assert repr(Counters().snapshot(0, 0)).endswith("hold_p50=0 ms, hold_p99=0 ms)")
    # Every field still shows, by its name.
    for name in SerializerStats.__dataclass_fields__:
        assert f"{name}=" in text


def test_observers_hear_every_sample_and_cannot_break_the_counters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counters = Counters()
    heard: list[tuple[str, float]] = []
    counters.observers.append(lambda kind, seconds: heard.append((kind, seconds)))

    def broken(kind: str, seconds: float) -> None:
        raise RuntimeError("exporter down")

    counters.observers.append(broken)
    with caplog.at_level(logging.ERROR, logger="writeturn"):
        counters.waits.append(0.5)
        counters.holds.append(0.25)
    assert heard == [("wait", 0.5), ("hold", 0.25)]
    assert list(counters.waits) == [0.5] and list(counters.holds) == [0.25]
    assert "a stats observer failed" in caplog.text
    snapshot = counters.snapshot(0, 0)
    assert (snapshot.wait_p50, snapshot.hold_p50) == (0.5, 0.25)
