"""The configuration matrix: one storm in every combination of the options where bugs
meet. Coordination (turn, advisory) x group commit (batch_max 1, 16) x isolation level
(Postgres: READ COMMITTED, REPEATABLE READ, SERIALIZABLE) x journal with idempotency
keys (off, on) x database (SQLite synchronous NORMAL and FULL, Postgres direct, Postgres
through PgBouncer in transaction mode): 16 SQLite cells and 48 Postgres cells.

Each cell checks, against the database, that committed writes are there once, that
nothing else is, and that every key's read-modify-write appends numbered 1..n with no
repeat (a repeat is a lost update). Select it alone with ``-m matrix``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import URL, make_url

from writeturn import ConfigurationError, WriteSerializer

from ._matrix import Cell, all_cells, prepare, run_cell
from ._pgbouncer import running_pgbouncer

pytestmark = pytest.mark.matrix


@pytest.fixture(scope="module")
def matrix_bouncer(writeturn_postgres_server: URL) -> Iterator[URL]:
    """One PgBouncer for the whole module, in front of the test server: each cell reaches
    its own fresh database through it by name."""
    with running_pgbouncer(writeturn_postgres_server.render_as_string(hide_password=False)) as u:
        yield make_url(u)


def _params() -> list[object]:
    return [
        pytest.param(cell, id=cell.id, marks=[pytest.mark.postgres] if cell.postgres else [])
        for cell in all_cells()
    ]


@pytest.fixture
def urls(cell: Cell, request: pytest.FixtureRequest) -> tuple[str, str]:
    """(the URL the cell's serializers use, the same database reached directly). Resolved
    here, outside the test's event loop, since the database fixtures run their own."""
    if not cell.postgres:
        url = str(request.getfixturevalue("sqlite_url"))
        return url, url
    direct = str(request.getfixturevalue("pg_url"))
    if cell.database != "pgbouncer":
        return direct, direct
    bouncer: URL = request.getfixturevalue("matrix_bouncer")
    database = make_url(direct).database
    return bouncer.set(database=database).render_as_string(hide_password=False), direct


@pytest.mark.parametrize("cell", _params())
async def test_matrix(cell: Cell, urls: tuple[str, str]) -> None:
    url, direct = urls
    if not cell.refused:
        await run_cell(cell, url, direct)
        return
    # Advisory locks through a transaction pooler at a snapshot isolation level:
    # refused at start, with the level named, instead of losing updates. The database
    # is ready for the cell, so that the level is the only thing to refuse.
    assert cell.isolation is not None
    await prepare(cell, direct)
    level = re.compile(cell.isolation.replace(" ", "[ _]"), re.IGNORECASE)
    ser = WriteSerializer.from_url(url, **cell.options())
    try:
        with pytest.raises(ConfigurationError, match=level):
            async with ser:
                pass
    finally:
        await ser.close()
