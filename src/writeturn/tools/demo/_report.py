"""The demo's report: what a run found, and its rendering as text."""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..._options import Coordination
from ...outcome import Outcome
from ...stats import SerializerStats
from ._checks import _OUTCOME_COLUMNS, Check, WriteResult
from ._plan import HOT_KEY, STRIP_LENGTH, CancelMode

# -- the report ------------------------------------------------------------------


@dataclass(frozen=True)
class DemoReport:
    """Everything the demo found; ``passed`` is True when every check passed.

    ``stalled`` counts the writes still unsettled when the time limit ran out;
    the run was then abandoned and ``checks`` is empty.
    """

    database: str  # redacted
    temporary: bool
    coordination: Coordination
    writers: tuple[str, ...]
    writes: int
    cancel_rate: float
    seed: int
    keys: tuple[str, ...]
    commit_order: str  # one letter per commit on the hot key, read from the ledger
    turn_order: str  # one letter per turn on the hot key; lowercase: it did not commit
    outcomes: Mapping[str, Mapping[Outcome, int]]
    cancels: Mapping[CancelMode, int]  # cancellations sent, by how
    checks: tuple[Check, ...]
    stats: SerializerStats
    elapsed: float
    unexpected: tuple[str, ...] = ()  # errors other than the demo's own cancellations
    stalled: int = 0
    results: tuple[WriteResult, ...] = ()  # every write of the race, in submission order
    kept: bool = False  # the demo's tables were left in the database

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.failures

    @property
    def planned(self) -> dict[CancelMode, int]:
        """Cancellations planned, by how."""
        return dict(Counter(r.planned for r in self.results if r.planned is not CancelMode.NONE))

    @property
    def failures(self) -> tuple[str, ...]:
        """Problems outside the checks: a stalled run, unexpected errors."""
        found = list(self.unexpected[:3])
        if self.stalled:
            found.insert(
                0,
                f"{self.stalled} of {len(self.writers) * self.writes} writes still unsettled "
                f"after {self.elapsed:.0f} s; the run was abandoned",
            )
        return tuple(found)

    @property
    def letters(self) -> dict[str, str]:
        return letters_for(self.writers)


def letters_for(writers: Iterable[str]) -> dict[str, str]:
    """Writer name -> its letter in the strips: writer-1 is A."""
    return dict(zip(writers, string.ascii_uppercase, strict=False))


def format_report(report: DemoReport, *, quiet: bool = False) -> str:
    """The report as text a person reads at a glance."""
    parts = (
        []
        if quiet
        else [_header(report), _strips(report), _outcome_table(report), _cancel_table(report)]
    )
    parts.append(_verdicts(report))
    return "\n\n".join(parts)


def _header(r: DemoReport) -> str:
    if r.temporary:
        where = " (temporary file, removed afterwards)"
    else:
        where = " (the demo's tables kept)" if r.kept else " (the demo's tables dropped afterwards)"
    others = len(r.keys) - 1
    keys = f'hot key "{HOT_KEY}"' + (f" + {others} other key{'s' * (others > 1)}" if others else "")
    planned = r.planned
    sent = f"{sum(planned.values())} cancellations planned: " + ", ".join(
        f"{planned.get(m, 0)} {label}" for m, label in _CANCEL_LABELS
    )
    return "\n".join(
        [
            "writeturn demo",
            f"  database      {r.database}{where}",
            f"  coordination  {r.coordination}",
            f"  workload      {len(r.writers)} writers x {r.writes} writes, {keys}",
            f"  cancel rate   {r.cancel_rate:g} (seed {r.seed}): {sent}",
        ]
    )


_CANCEL_LABELS = (
    (CancelMode.QUEUED, "while queued"),
    (CancelMode.TASK, "task cancelled mid-write"),
    (CancelMode.TIMEOUT, "timed out mid-write"),
)


def _strips(r: DemoReport) -> str:
    legend = "  ".join(f"{letter}={w}" for w, letter in r.letters.items())
    return "\n".join(
        [
            _strip(f'Commit order on "{HOT_KEY}", read from the ledger', r.commit_order, ""),
            _strip("Turn order, from the turn log", r.turn_order, "; lowercase: no commit"),
            f"  {legend}",
        ]
    )


def _strip(title: str, letters: str, note: str) -> str:
    shown = letters[:STRIP_LENGTH]
    more = "..." if len(letters) > STRIP_LENGTH else ""
    return f"{title} (first {len(shown)} of {len(letters)}{note}):\n  {shown or '(none)'}{more}"


def _outcome_table(r: DemoReport) -> str:
    width = max(len(w) for w in (*r.writers, "total")) + 2
    head = "Outcomes".ljust(width + 2) + "  ".join(label for _, label in _OUTCOME_COLUMNS)
    totals: Counter[Outcome] = Counter()
    lines = [head]
    for writer in r.writers:
        counts = r.outcomes.get(writer, {})
        totals.update(counts)
        lines.append(_outcome_line(f"{r.letters[writer]} {writer}", width, counts))
    lines.append(_outcome_line("  total", width, totals))
    return "\n".join(lines)


def _cancel_table(r: DemoReport) -> str:
    """Planned cancellations against outcomes: each row adds up to its planned count."""
    rows: list[tuple[str, list[WriteResult]]] = [
        (label, [x for x in r.results if x.planned is mode]) for mode, label in _CANCEL_LABELS
    ]
    rows.append(("not cancelled", [x for x in r.results if x.planned is CancelMode.NONE]))
    rows.append(("all writes", list(r.results)))
    width = max(len(label) for label, _ in rows) + 2
    heads = ["planned", "sent", *(label for _, label in _OUTCOME_COLUMNS)]
    lines = ["Cancellations".ljust(width + 2) + "  ".join(heads)]
    for label, found in rows:
        cancelled = label not in ("not cancelled", "all writes")
        outcomes = Counter(x.outcome for x in found)
        cells = [
            str(len(found)),
            str(sum(x.cancel_sent for x in found)) if cancelled else "-",
            *(str(outcomes[o]) for o, _ in _OUTCOME_COLUMNS),
        ]
        lines.append(
            f"  {label.ljust(width)}"
            + "  ".join(c.rjust(len(h)) for c, h in zip(cells, heads, strict=True))
        )
    lines.append(
        "  (a planned cancellation is not sent when its write had already run; it committed)"
    )
    return "\n".join(lines)


def _outcome_line(name: str, width: int, counts: Mapping[Outcome, int]) -> str:
    cells = "  ".join(str(counts.get(o, 0)).rjust(len(label)) for o, label in _OUTCOME_COLUMNS)
    return f"  {name.ljust(width)}{cells}"


def _verdicts(r: DemoReport) -> str:
    lines = ["Guarantees, checked against the database:"]
    lines += [
        f"  {'PASS' if c.passed else 'FAIL'}  {c.number or ' '} {c.name.ljust(17)} {c.detail}"
        for c in r.checks
    ]
    lines += [f"  FAIL  {problem}" for problem in r.failures]
    guarantees = [c for c in r.checks if c.number]
    failed = sum(not c.passed for c in guarantees)
    books = [c.name for c in r.checks if not c.number and not c.passed]
    if r.passed:
        verdict = f"All {len(guarantees)} guarantees hold, and the counts add up"
    elif r.stalled:
        verdict = "The run stalled: no verdict on the guarantees"
    elif failed:
        verdict = f"{failed} of {len(guarantees)} guarantees FAILED"
    elif books:
        verdict = f"The guarantees hold, but the {' and the '.join(books)} do not add up"
    else:
        verdict = "Unexpected errors"
    lines.append(f"\n{verdict} ({r.elapsed:.1f} s).")
    return "\n".join(lines)
