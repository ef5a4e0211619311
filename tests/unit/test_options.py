"""Option and argument checks: the journal's limits, sane bounds, and messages cut short."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from writeturn import ConfigurationError
from writeturn._options import (
    MAX_IDEMPOTENCY_KEY,
    MAX_KEY,
    MAX_NAMESPACE,
    MAX_WRITER,
    Options,
    check_busy_timeout,
    check_idempotency_key,
    check_key,
    check_writer,
    is_seconds,
)
from writeturn.errors import SHOWN_CHARS, shown

MIGRATION = Path(__file__).parents[2] / "migrations" / "versions" / "0001_journal.py"


def refusal(check: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigurationError) as caught:
        check(*args, **kwargs)
    return str(caught.value)


def test_the_limits_are_the_journal_columns_the_migration_creates() -> None:
    sizes = dict(re.findall(r'sa\.Column\("(\w+)", sa\.String\((\d+)\)', MIGRATION.read_text()))
    assert {k: int(v) for k, v in sizes.items()} == {
        "namespace": MAX_NAMESPACE,
        "key": MAX_KEY,
        "idempotency_key": MAX_IDEMPOTENCY_KEY,
        "writer": MAX_WRITER,
    }


@pytest.mark.parametrize(
    ("check", "name", "limit"),
    [
        (check_key, "key", MAX_KEY),
        (check_writer, "writer", MAX_WRITER),
        (check_idempotency_key, "idempotency_key", MAX_IDEMPOTENCY_KEY),
        (lambda v: Options(namespace=v), "namespace", MAX_NAMESPACE),
    ],
)
def test_names_longer_than_their_column_are_refused(check: Any, name: str, limit: int) -> None:
    check("x" * limit)  # the limit itself fits
    message = refusal(check, "x" * (limit + 1))
    assert f"{name} 'x" in message and f"({limit + 1} characters)" in message
    assert f"over the limit of {limit} characters" in message and "e.g." in message


@pytest.mark.parametrize(
    "check", [check_key, check_writer, check_idempotency_key, lambda v: Options(namespace=v)]
)
def test_nul_and_unencodable_text_are_refused(check: Any) -> None:
    assert "NUL character" in refusal(check, "a\x00b")
    assert "lone surrogate" in refusal(check, "a\ud800b")


def test_a_huge_value_is_named_in_a_line_not_repeated() -> None:
    huge = "k" * 1_000_000
    for check in (check_key, check_writer, check_idempotency_key):
        message = refusal(check, huge)
        assert "(1000000 characters)" in message
        assert len(message) < 500, message
    # A value of the wrong type is cut as well.
    message = refusal(check_key, list(range(100_000)))
    assert len(message) < 400 and "... (list)" in message
    assert len(refusal(check_idempotency_key, b"i" * 10_000)) < 400


def test_shown_cuts_long_values_and_says_how_long() -> None:
    assert shown("short") == "'short'"
    assert shown(42) == "42"
    long = shown("a" * 1000)
    assert long.startswith("'" + "a" * SHOWN_CHARS + "'...") and long.endswith("(1000 characters)")
    assert len(long) < SHOWN_CHARS + 40


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"batch_max": 10**9}, "from 1 to 10000"),
        ({"batch_max": 0}, "from 1 to 10000"),
        ({"batch_window": 1e9}, "at most 1.0 seconds"),
    ],
)
def test_batch_options_have_sane_upper_bounds(options: dict[str, Any], fragment: str) -> None:
    message = refusal(Options, **options)
    assert fragment in message
    assert "one transaction" in message or "delays every write" in message  # says why


def test_batch_bounds_themselves_are_accepted() -> None:
    assert Options(batch_max=10_000, batch_window=1.0).batch_max == 10_000


def test_busy_timeout_fits_sqlites_32_bit_milliseconds() -> None:
    assert check_busy_timeout(2_147_483.647) == 2_147_483.647
    message = refusal(check_busy_timeout, 3e6)
    assert "sqlite_busy_timeout=3000000.0 is too long" in message
    assert "32-bit count of milliseconds" in message


def test_a_long_url_is_cut_and_its_password_masked() -> None:
    from writeturn.errors import UnsupportedDatabase
    from writeturn.urls import normalize_url

    with pytest.raises(UnsupportedDatabase) as caught:
        normalize_url("mysql://app:hunter2@db/" + "d" * 100_000)
    message = str(caught.value)
    assert "app:***@db" in message and "hunter2" not in message
    assert "characters)" in message and len(message) < 600


@pytest.mark.parametrize(
    ("value", "allow_zero", "expected"),
    [
        (1, False, True),
        (0.5, False, True),
        (0, False, False),
        (0, True, True),
        (-1, True, False),
        (True, True, False),
        (math.inf, True, False),
        (math.nan, True, False),
        ("1", True, False),
        (None, True, False),
    ],
)
def test_one_check_says_what_a_number_of_seconds_is(
    value: object, allow_zero: bool, expected: bool
) -> None:
    assert is_seconds(value, allow_zero=allow_zero) is expected
