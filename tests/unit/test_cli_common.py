"""What the commands share: argument types with each command's bounds, password masking,
and the progress line with its estimate of the time left."""

from __future__ import annotations

import argparse
import io

import pytest

from writeturn.cli._common import (
    ProgressLine,
    choice_list,
    comma_list,
    mask,
    rate,
    seconds,
    whole,
)


def refused(parse: object, value: str) -> str:
    assert callable(parse)
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        parse(value)
    return str(caught.value)


def test_whole_numbers_keep_their_bounds() -> None:
    writers = whole("writers", 1, 26)
    assert writers("26") == 26
    assert refused(writers, "27") == "writers must be a whole number from 1 to 26, got '27'"
    assert "got 'x'" in refused(writers, "x")
    assert whole("burst", 1)("100000") == 100000
    assert refused(whole("burst", 1), "0") == "burst must be a whole number of at least 1, got '0'"


def test_rates_include_one_only_where_asked() -> None:
    demo, bench = rate("cancel rate", include_one=True), rate("cancel rate", include_one=False)
    assert demo("1") == 1.0 and demo("0") == 0.0
    assert bench("0.99") == 0.99
    assert "from 0 up to (not including) 1, got '1'" in refused(bench, "1")
    for bad in ("-0.1", "1.5", "nan", "inf", "lots"):
        assert f"got {bad!r}" in refused(demo, bad)


def test_seconds_above_or_from_zero() -> None:
    assert seconds("idle threshold", allow_zero=True)("0") == 0.0
    assert "above 0, got '0'" in refused(seconds("lock timeout", allow_zero=False), "0")
    assert "0 or more, got '-1'" in refused(seconds("idle threshold", allow_zero=True), "-1")
    assert "got 'inf'" in refused(seconds("time limit", allow_zero=False), "inf")


def test_lists() -> None:
    assert comma_list(whole("writers", 1))("1, 8,64") == [1, 8, 64]
    assert "writers must be a whole number of at least 1, got '0'" in refused(
        comma_list(whole("writers", 1)), "1,0"
    )
    assert refused(comma_list(whole("writers", 1)), ",") == "expected a comma list, got ','"
    levels = choice_list("levels", ("NORMAL", "FULL"), str.upper)
    assert levels("normal,full") == ["NORMAL", "FULL"]
    assert refused(levels, "fast") == "levels: 'FAST'; choose from NORMAL, FULL"


def test_mask_hides_the_passwords_of_given_urls_anywhere() -> None:
    url = "postgresql://app:p%40ss/w0rd@db/app"  # a password with an escaped @ and a slash
    text = "could not connect as app with password p@ss/w0rd to postgresql://app:p%40ss/w0rd@db"
    masked = mask(text, [url])
    assert "p@ss/w0rd" not in masked and "p%40ss" not in masked, masked
    # Both forms of the password, wherever they appear, even outside a URL.
    assert mask("tried p%40ss/w0rd then p@ss/w0rd", [url], patterns=False) == ("tried *** then ***")
    assert mask("unrecognized arguments: --urls x://u:hunter2@h/d") == (
        "unrecognized arguments: --urls x://u:***@h/d"
    )
    assert "hunter2" not in mask("dsn host=db password=hunter2 user=app")
    # writeturn's own messages quote the URL form on purpose; without patterns it stays.
    assert mask("use postgresql://user:password@host/db", patterns=False) == (
        "use postgresql://user:password@host/db"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_estimates_the_time_left() -> None:
    clock, out = Clock(), io.StringIO()
    line = ProgressLine(out, "cells", force=True, clock=clock)
    assert line.text(0, 84) == "[ 0/84 cells] 0s"
    clock.now += 30
    assert line.text(6, 84, "sqlite insert") == (
        "[ 6/84 cells] 30s, about 6m30s left  sqlite insert"
    )
    clock.now += 3 * 3600
    assert line.text(83, 84).endswith("3h00m, about 2m10s left")
    assert line.text(84, 84) == "[84/84 cells] 3h00m"
    line.update(1, 2, "x")
    line.finish()
    assert out.getvalue().startswith("\r[1/2 cells]")
    assert out.getvalue().endswith("\r")


def test_progress_line_is_silent_off_a_terminal() -> None:
    out = io.StringIO()
    line = ProgressLine(out)
    line.update(1, 2)
    line.finish()
    assert not line.enabled and out.getvalue() == ""
