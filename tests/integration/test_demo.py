"""``writeturn demo``: it runs on SQLite and Postgres, every guarantee line says PASS, the
report never shows a password, bad options exit 2, and each check does fail on bad data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from writeturn import Outcome
from writeturn.cli import main
from writeturn.demo import (
    HOT_KEY,
    Check,
    DemoOptions,
    LedgerRow,
    PgLeftovers,
    Turn,
    WriteResult,
    check_alternation,
    check_cancellation,
    check_handover,
    check_mutual_exclusion,
    check_order,
    check_outcome_truth,
    check_stats,
    longest_run,
    plan_writes,
    run_demo,
)
from writeturn.errors import ConfigurationError
from writeturn.stats import SerializerStats

GUARANTEES = (
    "mutual exclusion",
    "order",
    "alternation",
    "clean hand-over",
    "cancellation",
    "outcome truth",
    "re-entrancy",
    "timeouts",
)
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
