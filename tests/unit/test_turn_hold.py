"""The turn choreography every runner shares (TurnHold), driven by random sequences.

A real runtime on a SQLite file (SQLite: it has the database-wide gate; no
connection is opened), real turn locks, real write records. Whatever the
runner does in whatever order (mark the task, wait for the gate, pass the turn
on early, release, release again), the gate is handed on before the key's turn,
the key's turn exactly once, and the re-entrancy marker is gone afterwards.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from writeturn import WriteSerializer
from writeturn._runtime import GATE_KEY, HELD, Runtime, holds_turn
from writeturn._turn import TurnHold
from writeturn._write import WriteRecord

#: What a runner may do before its release (each of mark and gate once, pass any number
#: of times); then one release, or two.
STEPS = st.tuples(
    st.lists(st.sampled_from(["mark", "gate", "pass"]), max_size=8),
    st.integers(min_value=1, max_value=2),
).map(lambda t: [*t[0], *["release"] * t[1]])


def _record(rt: Runtime, writer: str, seen: list[str]) -> WriteRecord:
    record = WriteRecord(rt, "k", writer, lambda s: None)
    rt.enter(record)

    def granted(r: WriteRecord) -> None:
        # What the next holder finds at its grant: the gate must be free by then.
        seen.append(f"grant {r.writer} gate_held={rt.gate.key_statistics(GATE_KEY).held}")  # type: ignore[union-attr]

    record.arm(on_grant=granted)
    if rt.turns.enqueue("k", record):
        record.on_grant()
    return record


async def _scenario(rt: Runtime, batch: bool, steps: list[str]) -> None:
    seen: list[str] = []
    first = _record(rt, "A", seen)
    assert first.holds_turn
    if batch:
        first.transfer_turn()
        hold = TurnHold.of_batch(rt, "k")
    else:
        hold = TurnHold.of_write(rt, first)
    nxt = _record(rt, "B", seen)  # waits for the key's turn
    task = asyncio.current_task()
    assert task is not None
    before = HELD.get()
    marked = gated = passed = False
    # Where the turn goes on at release(), the gate went first; an early pass (a
    # Postgres write whose COMMIT goes out) hands it on as things stand.
    gate_at_grant: bool | None = None
    for step in steps:
        if step == "mark" and not marked:
            hold.mark(task)
            marked = True
            assert holds_turn(rt, "k") == "k"
        elif step == "gate" and not gated:  # a runner takes it once
            await hold.take_gate()
            gated = True
            assert rt.gate is not None and rt.gate.key_statistics(GATE_KEY).held
        elif step in ("pass", "release"):
            if not passed:
                gate_at_grant = gated and step == "pass"
            passed = True
            if step == "pass":
                hold.pass_turn()
        if step == "release":
            hold.release()
            assert rt.gate is not None and not rt.gate.key_statistics(GATE_KEY).held
            assert HELD.get() == before
            assert holds_turn(rt, "k") is None
        # The key's turn went on exactly once, at the first pass or release.
        grants = [s for s in seen if s.startswith("grant B")]
        assert len(grants) == (1 if passed else 0), (steps, seen)
    assert seen == [f"grant A gate_held={False}", f"grant B gate_held={gate_at_grant}"], seen
    assert nxt.holds_turn and not first.holds_turn
    nxt.release_turn()


@settings(max_examples=150, deadline=None)
@given(batch=st.booleans(), steps=STEPS)
def test_the_gate_then_the_turn_then_the_marker_once_each(
    tmp_path_factory: Any, batch: bool, steps: list[str]
) -> None:
    path: Path = tmp_path_factory.mktemp("hold") / "x.db"
    ser = WriteSerializer.from_url(f"sqlite+aiosqlite:///{path}")

    async def main() -> None:
        try:
            await _scenario(ser._rt, batch, steps)
        finally:
            await ser.engine.dispose()

    asyncio.run(main())
