"""Advisory coordination across OS processes: exact counts on Postgres and on one SQLite file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ._db import counter, create_tables, serializer

WORKER = Path(__file__).with_name("_proc_worker.py")
PROCESSES, TASKS, WRITES = 4, 5, 20


async def run_processes(
    url: str, coordination: str, tmp_path: Path, *, through: str | None = None
) -> int:
    """Start the writer processes together; return how many increments they committed.

    ``through``: a URL of the same database behind PgBouncer, which the writers use.
    """
    async with serializer(url) as ser:
        await create_tables(ser.engine)
    barrier = tmp_path / "go"
    args = [str(WORKER), through or url, coordination, str(TASKS), str(WRITES), str(barrier)]
    if through is not None:
        args.append("pgbouncer")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(PROCESSES)
    ]
    barrier.touch()
    committed = 0
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        committed += json.loads(out.decode().strip().splitlines()[-1])["committed"]
    return committed


@pytest.mark.slow
async def test_advisory_mode_is_exact_across_processes(db_url: str, tmp_path: Path) -> None:
    committed = await run_processes(db_url, "advisory", tmp_path)
    assert committed == PROCESSES * TASKS * WRITES
    async with serializer(db_url) as ser:
        assert await counter(ser.engine) == committed


@pytest.mark.slow
@pytest.mark.postgres
async def test_turn_mode_does_not_coordinate_processes(pg_url: str, tmp_path: Path) -> None:
    """The control: in-process turns alone lose updates when other processes write too."""
    committed = await run_processes(pg_url, "turn", tmp_path)
    assert committed == PROCESSES * TASKS * WRITES
    async with serializer(pg_url) as ser:
        assert await counter(ser.engine) < committed
