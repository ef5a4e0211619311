"""writeturn.testing, used as a user would: a pytest run of a user's test files.

The user's tests run in a pytest subprocess (pytester) with the plugin enabled through
``pytest_plugins``. They check that each test gets a migrated database of its own
(the journal exists, and what one test wrote is not in the next test's database), that
the serializer fixture is started, and how a missing server is reported.
"""

from __future__ import annotations

import socket

import pytest

USER_CONFTEST = """
import pytest

pytest_plugins = ["writeturn.testing"]


@pytest.fixture(params=["sqlite", "postgres"])
def writeturn_url(request):
    return request.getfixturevalue(f"writeturn_{request.param}_url")
"""

USER_TESTS = """
import pytest
from sqlalchemy import text

from writeturn import Outcome


async def journal_rows(ser):
    async with ser.engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM writeturn_journal"))).scalar()


async def add(session, n):
    await session.execute(text("SELECT 1"))
    return n


@pytest.mark.asyncio
@pytest.mark.parametrize("round", [1, 2, 3])
async def test_each_test_starts_from_the_migrated_template(writeturn_serializer, round):
    ser = writeturn_serializer
    assert await journal_rows(ser) == 0
    handle = ser.submit(add, round, key="k", idempotency_key=f"add-{round}")
    assert await handle == round
    assert handle.outcome is Outcome.COMMITTED
    assert await journal_rows(ser) == 1
"""


@pytest.mark.postgres
def test_user_tests_get_migrated_isolated_databases(
    pytester: pytest.Pytester, pg_admin_url: object
) -> None:
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=6)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once closed


@pytest.mark.parametrize("required", [False, True])
def test_no_server_is_a_skip_that_says_how_to_start_one(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, required: bool
) -> None:
    url = f"postgresql+asyncpg://postgres:s3cret@127.0.0.1:{_closed_port()}/test"
    monkeypatch.setenv("WRITETURN_TEST_POSTGRES_URL", url)
    monkeypatch.setenv("WRITETURN_REQUIRE_POSTGRES", "1" if required else "0")
    pytester.makeconftest('pytest_plugins = ["writeturn.testing"]\n')
    pytester.makepyfile(test_user="def test_pg(writeturn_postgres_url):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rsE")
    out = result.stdout.str()
    assert "docker compose up -d --wait" in out and "WRITETURN_TEST_POSTGRES_URL" in out
    assert "s3cret" not in out
    if required:
        result.assert_outcomes(errors=1)
        assert "WRITETURN_REQUIRE_POSTGRES=1" in out
    else:
        result.assert_outcomes(skipped=1)
