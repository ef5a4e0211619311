"""Which failed attempts run again (retry_delay), by the outcome and error they ended with."""

from __future__ import annotations

import pytest

from writeturn._retry import retry_delay
from writeturn._write import State
from writeturn.errors import DatabaseUnreachable
from writeturn.outcome import Outcome
from writeturn.stats import Counters

from .test_write_state import in_state


@pytest.mark.parametrize("state", [State.RUNNING, State.ROLLING_BACK])
def test_a_database_unreachable_after_the_attempt_began_is_retried(state: State) -> None:
    """BEGIN found its connection dead and the fresh connect failed (a server shutting
    down at a failover): nothing of the attempt is in the database, so it runs again,
    as it would had the first connect failed."""
    _, record, _ = in_state(state)
    record.retries = 3
    counters = Counters()
    delay = retry_delay(
        record,
        Outcome.ROLLED_BACK,
        DatabaseUnreachable("cannot reach the database: the database system is shutting down"),
        dialect="postgresql",
        backoff=0.01,
        counters=counters,
    )
    assert delay is not None and counters.retries == 1


def test_an_ordinary_error_is_not_retried() -> None:
    _, record, _ = in_state(State.ROLLING_BACK)
    record.retries = 3
    assert (
        retry_delay(
            record,
            Outcome.ROLLED_BACK,
            ValueError("the function's own error"),
            dialect="postgresql",
            backoff=0.01,
            counters=Counters(),
        )
        is None
    )
