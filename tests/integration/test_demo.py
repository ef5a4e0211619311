"""``writeturn demo``: it runs on SQLite and Postgres, every guarantee line says PASS, the
report never shows a password, bad options exit 2, and each check does fail on bad data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from writeturn import Outcome
from writeturn.cli import main
from writeturn.errors import ConfigurationError
from writeturn.stats import SerializerStats
from writeturn.tools.demo import (
    GUARANTEES,
    HOT_KEY,
    CancelMode,
    Check,
    DemoOptions,
    LedgerRow,
    PgLeftovers,
    ProbeRow,
    Reentry,
    TimedWrite,
    Turn,
    WriteResult,
    check_alternation,
    check_cancellation,
    check_counts,
    check_handover,
    check_mutual_exclusion,
    check_order,
    check_outcome_truth,
    check_reentrancy,
    check_stats,
    check_timeouts,
    format_report,
    longest_run,
    plan_writes,
    run_demo,
)

from ._blocks import ROOT, guarantee_names

BOOKKEEPING = ("counts", "stats")
PASSWORD = "pw_s3cret"
SMALL = ["--writers", "3", "--writes", "30"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["demo", *args])
    out, err = capsys.readouterr()
    return code, out + err


def run_module(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "writeturn", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def test_the_demo_checks_the_readme_guarantees_in_order() -> None:
    # The demo's own list is the one the tests use: it must be the README's.
    assert [name.lower() for name in guarantee_names(ROOT / "README.md")] == list(GUARANTEES)


def assert_all_pass(output: str) -> None:
    for number, name in enumerate(GUARANTEES, 1):
        assert re.search(rf"^  PASS  {number} {re.escape(name)} ", output, re.M), output
    for name in BOOKKEEPING:
        assert re.search(rf"^  PASS    {name} ", output, re.M), output
    assert "FAIL" not in output, output
    assert "All 8 guarantees hold, and the counts add up" in output


def commit_strip(output: str) -> str:
    lines = output.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("Commit order on"))
    return lines[title + 1].strip().rstrip(".")


# -- end to end -----------------------------------------------------------------------


def test_default_run_on_a_temporary_sqlite_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli([], capsys)
    assert code == 0, out
    assert_all_pass(out)
    assert "4 writers x 50 writes" in out
    assert "A=writer-1  B=writer-2  C=writer-3  D=writer-4" in out
    assert re.fullmatch(r"[ABCD]{60}", commit_strip(out)), out
    # The temporary database is gone afterwards.
    database = re.search(r"database +sqlite\+aiosqlite:///(\S+) \(temporary", out)
    assert database is not None, out
    assert not Path(database.group(1)).exists()
    assert not Path(database.group(1)).parent.exists()


def test_module_run_on_a_given_sqlite_file(sqlite_url: str) -> None:
    done = run_module(["--url", sqlite_url, *SMALL])
    assert done.returncode == 0, done.stdout + done.stderr
    assert_all_pass(done.stdout)
    assert done.stderr == ""
    assert Path(make_url(sqlite_url).database or "").exists()  # a given file is kept


def test_without_cancellations_the_writers_alternate(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_cli(["--url", sqlite_url, *SMALL, "--keys", "0", "--cancel-rate", "0"], capsys)
    assert code == 0, out
    assert commit_strip(out) == "ABC" * 20
    assert "longest run by one writer on hot: 1 " in out


@pytest.mark.postgres
@pytest.mark.parametrize("coordination", ["advisory", "turn"])
def test_postgres(pg_url: str, coordination: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(["--url", pg_url, "--coordination", coordination], capsys)
    assert code == 0, out
    assert_all_pass(out)
    assert f"coordination  {coordination}" in out
    assert "no advisory lock and no idle-in-transaction session left" in out


@pytest.mark.postgres
def test_module_run_on_postgres_never_prints_the_password(pg_url: str) -> None:
    url = make_url(pg_url).set(password=PASSWORD).render_as_string(hide_password=False)
    assert PASSWORD in url
    done = run_module(["--url", url, *SMALL])
    assert done.returncode == 0, done.stdout + done.stderr
    assert_all_pass(done.stdout)
    assert PASSWORD not in done.stdout + done.stderr
    assert ":***@" in done.stdout


def test_an_unreachable_database_is_an_error_without_the_password() -> None:
    url = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:1/nowhere"
    done = run_module(["--url", url, "--writes", "1"])
    assert done.returncode == 1
    assert "writeturn demo: error: cannot reach" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr


async def test_run_demo_returns_the_checks(sqlite_url: str) -> None:
    report = await run_demo(DemoOptions(url=sqlite_url, writers=2, writes=20, cancel_rate=0.5))
    assert [c.name for c in report.checks] == [*GUARANTEES, *BOOKKEEPING]
    assert report.passed, report.checks
    assert not report.stalled and not report.unexpected
    committed = sum(o.get(Outcome.COMMITTED, 0) for o in report.outcomes.values())
    assert committed == report.stats.committed > 0
    assert len(report.commit_order) <= committed  # the strip is the hot key's share
    # The turns that committed, in turn order, are the ledger's commit order.
    assert "".join(c for c in report.turn_order if c.isupper()) == report.commit_order


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_extreme_cancel_rates(sqlite_url: str, rate: float) -> None:
    report = await run_demo(DemoOptions(url=sqlite_url, writers=3, writes=15, cancel_rate=rate))
    assert report.passed, report.checks
    if rate == 0.0:
        assert report.stats.committed == 45
        assert not report.cancels
    else:
        assert sum(report.cancels.values()) > 0


async def test_a_single_writer(sqlite_url: str) -> None:
    report = await run_demo(DemoOptions(url=sqlite_url, writers=1, writes=10, keys=0))
    assert report.passed, report.checks
    assert set(report.commit_order) <= {"A"}


def test_the_plan_depends_on_the_seed_alone() -> None:
    options = DemoOptions(seed=3)
    assert plan_writes(options) == plan_writes(DemoOptions(seed=3))
    assert plan_writes(options) != plan_writes(DemoOptions(seed=4))
    modes = {p.mode.value for p in plan_writes(DemoOptions())}
    assert modes == {"none", "queued", "task", "timeout"}


# -- invalid options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--writers", "0"], "writers must be a whole number from 1 to 26"),
        (["--writers", "27"], "writers must be a whole number from 1 to 26"),
        (["--writes", "many"], "writes must be a whole number"),
        (["--cancel-rate", "1.5"], "must be a number from 0 to 1"),
        (["--cancel-rate", "-0.1"], "must be a number from 0 to 1"),
        (["--cancel-rate", "nan"], "must be a number from 0 to 1"),
        (["--coordination", "lock"], "invalid choice"),
        (["--keys", "-1"], "keys must be a whole number from 0 to 10"),
        (["--time-limit", "0"], "above 0"),
    ],
)
def test_invalid_options_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["demo", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert PASSWORD not in err


@pytest.mark.parametrize("url", ["mysql://u@h/db", f"mysql://u:{PASSWORD}@h/db"])
def test_an_unsupported_url_exits_2(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", url]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("writeturn demo: error: unsupported database URL"), err
    assert len(err.splitlines()) == 1
    assert PASSWORD not in err


def test_invalid_options_are_refused_programmatically_too() -> None:
    with pytest.raises(ConfigurationError, match="writers must be"):
        DemoOptions(writers=0)
    with pytest.raises(ConfigurationError, match="cancel rate"):
        DemoOptions(cancel_rate=2)
    with pytest.raises(ConfigurationError, match="coordination"):
        DemoOptions(coordination="lock")  # type: ignore[arg-type]


# -- the checks fail on bad data -------------------------------------------------------------


def rows(*specs: tuple[str, int, int]) -> list[LedgerRow]:
    """Ledger rows on the hot key from (writer, writer_seq, balance_after), ids 1, 2, ..."""
    return [LedgerRow(i, HOT_KEY, w, seq, bal) for i, (w, seq, bal) in enumerate(specs, 1)]


def committed(*writes: tuple[str, int]) -> list[WriteResult]:
    return [WriteResult(w, seq, HOT_KEY, Outcome.COMMITTED) for w, seq in writes]


def stats(**counts: int) -> SerializerStats:
    base = dict.fromkeys(SerializerStats.__dataclass_fields__, 0)
    return SerializerStats(**{**base, **counts})


def fails(check: Check) -> str:
    assert not check.passed, check
    return check.detail


def test_mutual_exclusion_passes_on_consistent_data() -> None:
    good = rows(("A", 0, 1), ("B", 0, 2))
    check = check_mutual_exclusion({HOT_KEY: 2}, good, committed(("A", 0), ("B", 0)))
    assert check.passed, check


def test_mutual_exclusion_fails_on_a_lost_update() -> None:
    # Both writers read 0 and wrote 1: two rows, two commits, but the counter says 1.
    lost = rows(("A", 0, 1), ("B", 0, 1))
    results = committed(("A", 0), ("B", 0))
    assert "counter 1, 2 committed, 2 ledger rows" in fails(
        check_mutual_exclusion({HOT_KEY: 1}, lost, results)
    )
    # Even with a counter that agrees, balances 1, 1 are not 1..N.
    assert "balance 1 where 2 was due" in fails(check_mutual_exclusion({HOT_KEY: 2}, lost, results))


def test_order_fails_when_a_writer_commits_out_of_order() -> None:
    assert check_order(rows(("A", 0, 1), ("A", 2, 2))).passed
    assert "committed write #0 on hot after #1" in fails(
        check_order(rows(("A", 1, 1), ("B", 0, 2), ("A", 0, 3)))
    )


def test_alternation_fails_on_an_unfair_run() -> None:
    fair = [
        Turn(HOT_KEY, "A", ("B", "A")),
        Turn(HOT_KEY, "B", ("A",)),
        Turn(HOT_KEY, "A", ()),
        Turn(HOT_KEY, "A", ()),  # nobody else waited: a run is fine
    ]
    assert check_alternation(fair).passed
    assert longest_run(fair, HOT_KEY) == ("A", 2)
    unfair = [
        Turn(HOT_KEY, "A", ("A", "B")),
        Turn(HOT_KEY, "A", ("A", "B")),
        Turn(HOT_KEY, "A", ("B",)),
        Turn(HOT_KEY, "B", ()),
    ]
    detail = fails(check_alternation(unfair))
    assert "A took turns 1 and 2 on hot while B waited (+1 more)" in detail
    assert "longest run by one writer on hot: 3 (A)" in detail


def test_alternation_looks_at_each_key_apart() -> None:
    turns = [Turn(HOT_KEY, "A", ("B",)), Turn("other", "A", ()), Turn(HOT_KEY, "B", ())]
    assert check_alternation(turns).passed


def test_handover_fails_on_overlap_or_leftovers() -> None:
    assert check_handover({HOT_KEY: 1}, PgLeftovers(0, 0)).passed
    assert "2 writes in flight at once on hot" in fails(check_handover({HOT_KEY: 2}, None))
    assert "1 advisory locks left" in fails(check_handover({HOT_KEY: 1}, PgLeftovers(1, 0)))
    assert "idle in transaction" in fails(check_handover({HOT_KEY: 1}, PgLeftovers(0, 1)))


def test_cancellation_fails_when_a_cancelled_write_landed() -> None:
    withdrawn = WriteResult("A", 0, HOT_KEY, Outcome.WITHDRAWN, cancelled_while_queued=True)
    assert check_cancellation([withdrawn], []).passed
    ran = WriteResult("A", 0, HOT_KEY, Outcome.ROLLED_BACK, cancelled_while_queued=True)
    assert "cancelled while queued ended rolled_back" in fails(check_cancellation([ran], []))
    rolled_back = WriteResult("A", 0, HOT_KEY, Outcome.ROLLED_BACK)
    assert "its ledger row exists" in fails(check_cancellation([rolled_back], rows(("A", 0, 1))))


def test_outcome_truth_fails_on_any_mismatch() -> None:
    assert check_outcome_truth(committed(("A", 0)), rows(("A", 0, 1))).passed
    assert "1 COMMITTED without a row" in fails(check_outcome_truth(committed(("A", 0)), []))
    rolled_back = [WriteResult("A", 0, HOT_KEY, Outcome.ROLLED_BACK)]
    assert "not reported COMMITTED" in fails(check_outcome_truth(rolled_back, rows(("A", 0, 1))))
    twice = rows(("A", 0, 1), ("A", 0, 2))
    assert "more than one row" in fails(check_outcome_truth(committed(("A", 0)), twice))


def test_stats_fail_when_they_disagree_with_the_handles() -> None:
    results = [
        *committed(("A", 0)),
        WriteResult("A", 1, HOT_KEY, Outcome.WITHDRAWN, cancelled_while_queued=True),
    ]
    good = stats(committed=1, withdrawn=1, cancel_requests=1)
    assert check_stats(good, results, cancels_sent=1).passed
    assert "stats committed 2, handles 1" in fails(
        check_stats(stats(committed=2, withdrawn=1, cancel_requests=1), results, 1)
    )
    assert "cancel_requests 0 outside 1..1" in fails(
        check_stats(stats(committed=1, withdrawn=1), results, 1)
    )
    assert "1 connections invalidated for 1 cancellations" in fails(
        check_stats(
            stats(committed=1, withdrawn=1, cancel_requests=1, connections_invalidated=1),
            results,
            1,
        )
    )
    assert "1 queued and 0 running" in fails(
        check_stats(stats(committed=1, withdrawn=1, cancel_requests=1, queued=1), results, 1)
    )


# -- the same seed, the same report; the tables; progress ---------------------------------


def without_timings(text: str) -> str:
    """The report minus what may differ between two runs: the elapsed time and the file."""
    lines = text.splitlines()
    return "\n".join(
        re.sub(r"\(\d+\.\d s\)\.$", "", line) for line in lines if "  database  " not in line
    )


async def test_the_same_seed_gives_the_same_report(db_url: str) -> None:
    url = db_url
    options = DemoOptions(url=url, writers=5, writes=60, keys=2, seed=11)
    first = await run_demo(options)
    second = await run_demo(options)
    assert first.passed and second.passed, first.checks
    assert without_timings(format_report(first)) == without_timings(format_report(second))
    assert first.results == second.results
    # ...and a different seed gives a different race.
    other = await run_demo(DemoOptions(url=url, writers=5, writes=60, keys=2, seed=12))
    assert other.results != first.results


async def demo_tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()
    return {n for n in names if n.startswith("writeturn_demo_")}


async def test_the_tables_are_dropped_unless_kept(db_url: str) -> None:
    report = await run_demo(DemoOptions(url=db_url, writers=2, writes=10))
    assert report.passed and not report.kept
    assert await demo_tables(db_url) == set()
    kept = await run_demo(DemoOptions(url=db_url, writers=2, writes=10, keep=True))
    assert kept.passed and kept.kept
    tables = {"writeturn_demo_ledger", "writeturn_demo_counter", "writeturn_demo_probe"}
    assert await demo_tables(db_url) == tables
    # A kept ledger is the run's: one row per committed write.
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM writeturn_demo_ledger"))).one()
    finally:
        await engine.dispose()
    assert count[0] == kept.stats.committed
    # The next run starts from empty tables, and drops them again.
    again = await run_demo(DemoOptions(url=db_url, writers=2, writes=10))
    assert again.passed
    assert await demo_tables(db_url) == set()


def test_keep_through_the_cli(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(["--url", sqlite_url, *SMALL, "--keep"], capsys)
    assert code == 0, out
    assert "(the demo's tables kept)" in out
    code, out = run_cli(["--url", sqlite_url, *SMALL], capsys)
    assert code == 0, out
    assert "(the demo's tables dropped afterwards)" in out


async def test_progress_is_reported_until_every_write_settled(sqlite_url: str) -> None:
    seen: list[tuple[int, int]] = []
    report = await run_demo(
        DemoOptions(url=sqlite_url, writers=4, writes=150), progress=lambda *a: seen.append(a)
    )
    assert report.passed
    assert seen, "no progress was reported"
    assert seen[-1] == (600, 600)
    assert all(total == 600 for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


async def test_the_counts_add_up(sqlite_url: str) -> None:
    report = await run_demo(DemoOptions(url=sqlite_url, writers=4, writes=60, cancel_rate=0.5))
    assert report.passed, report.checks
    results = report.results
    assert len(results) == 240
    planned = [r for r in results if r.planned is not CancelMode.NONE]
    assert sum(report.planned.values()) == len(planned) > 0
    assert sum(report.cancels.values()) == sum(r.cancel_sent for r in planned)
    not_committed = [r for r in results if r.outcome is not Outcome.COMMITTED]
    # Every write that did not commit was a cancellation that was sent.
    assert all(r.cancel_sent for r in not_committed)
    assert report.stats.committed + len(not_committed) == 240
    text_report = format_report(report)
    assert re.search(rf"^  all writes +240 +- +{report.stats.committed} ", text_report, re.M)


# -- the new checks fail on bad data ---------------------------------------------------------


def test_reentrancy_fails_when_an_attempt_was_queued_or_ran() -> None:
    ok = Reentry("A", 0, HOT_KEY, HOT_KEY, "ReentrantWriteError")
    assert check_reentrancy([ok], [], committed(("A", 0))).passed
    queued = Reentry("A", 0, HOT_KEY, HOT_KEY, "")
    assert "raised nothing (the write was queued behind its own turn)" in fails(
        check_reentrancy([queued], [], committed(("A", 0)))
    )
    ran = [ProbeRow("reentrant", "A #0")]
    assert "1 re-entrant writes ran" in fails(check_reentrancy([ok], ran, committed(("A", 0))))
    rolled_back = [WriteResult("A", 0, HOT_KEY, Outcome.ROLLED_BACK)]
    assert "ended rolled_back after its attempt" in fails(check_reentrancy([ok], [], rolled_back))


def timed(name: str, started: bool, raised: str, outcome: Outcome) -> TimedWrite:
    return TimedWrite(name, "running" if started else "queued", 0.1, started, raised, outcome)


BOOKENDS = [ProbeRow("timeout", "holder"), ProbeRow("timeout", "after")]


def test_timeouts_fail_on_a_wrong_outcome_exception_or_row() -> None:
    good = [
        timed("queued-1", False, "TurnTimeout", Outcome.WITHDRAWN),
        timed("running-1", True, "TurnTimeout", Outcome.ROLLED_BACK),
    ]
    assert check_timeouts(good, BOOKENDS).passed
    assert "raised CancelledError, not TurnTimeout" in fails(
        check_timeouts([timed("q", False, "CancelledError", Outcome.WITHDRAWN)], BOOKENDS)
    )
    assert "ended rolled_back although its function never started" in fails(
        check_timeouts([timed("q", False, "TurnTimeout", Outcome.ROLLED_BACK)], BOOKENDS)
    )
    assert "running-1 timed out but its row exists" in fails(
        check_timeouts(good, [*BOOKENDS, ProbeRow("timeout", "running-1")])
    )
    assert "left 1 and 0 rows" in fails(check_timeouts(good, BOOKENDS[:1]))


def test_counts_fail_when_a_write_is_unaccounted_for() -> None:
    unsent = WriteResult("A", 0, HOT_KEY, Outcome.COMMITTED, planned=CancelMode.QUEUED)
    sent = WriteResult(
        "A", 1, HOT_KEY, Outcome.ROLLED_BACK, planned=CancelMode.TASK, cancel_sent=True
    )
    assert check_counts([unsent, sent, *committed(("B", 0))], 3).passed
    assert "3 outcomes for 4 writes" in fails(check_counts([unsent, sent, *committed(("B", 0))], 4))
    lost = WriteResult("B", 0, HOT_KEY, Outcome.ROLLED_BACK)
    assert "nobody cancelled it, yet it ended rolled_back" in fails(check_counts([lost], 1))
    never_sent = WriteResult("A", 0, HOT_KEY, Outcome.WITHDRAWN, planned=CancelMode.QUEUED)
    assert "was never sent, yet it ended withdrawn" in fails(check_counts([never_sent], 1))


def test_cancellation_fails_when_a_timeout_does_not_raise_timeout_error() -> None:
    result = WriteResult(
        "A",
        0,
        HOT_KEY,
        Outcome.ROLLED_BACK,
        planned=CancelMode.TIMEOUT,
        cancel_sent=True,
        raised="CancelledError",
    )
    assert "timeout cancellation raised CancelledError, not TimeoutError" in fails(
        check_cancellation([result], [])
    )
