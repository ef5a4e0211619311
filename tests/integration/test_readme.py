"""The README runs: its first example as a pasted script, and every other Python block in
order against a real database (SQLite, and Postgres). Its command lines are those of the
site's pages, which ``test_docs`` checks against the real command-line tools.

The blocks share one namespace, as in a reader's session; the names they may use without
defining them are listed in ``_blocks``, whose runner the documentation site's test uses
too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from writeturn import Outcome
from writeturn.alembic_env import include_name, include_object

from . import _blocks
from ._blocks import balance_of, reader_namespace, run_blocks

README = _blocks.ROOT / "README.md"


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, dedented code) of every fenced block in ``lang``."""
    return _blocks.blocks(README, lang)


def test_the_first_example_runs_as_pasted(tmp_path: Path) -> None:
    line, code = blocks("python")[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    outputs = []
    for _ in range(2):  # once on a new file, once again on the same
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"README line {line}:\n{done.stderr}"
        outputs.append(done.stdout.strip())
    assert outputs == ["balance 10", "balance 20"]


async def test_every_python_block_runs(db_url: str, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may name sqlite:///app.db
    async with reader_namespace(db_url, "readme") as ns:
        ran = await run_blocks(blocks("python")[1:], ns, "README.md")

        # What the blocks did, checked against the database and the recorder.
        handle = ns["handle"]  # the journal block's write
        assert handle.outcome is Outcome.COMMITTED and handle.seq == 1
        assert not handle.duplicate
        assert ns["result"] == 10  # the API block's run(fn, *args)
        # 100, +10 submit, +10 run, -1 in a transaction() block, +7 the charge
        assert await balance_of(ns) == 126
        env = ns["context"]
        assert env.configured["include_name"] is include_name
        assert env.configured["include_object"] is include_object
        # The migration lock snippet, run on a real connection.
        async with ns["engine"].connect() as conn:
            await conn.run_sync(ns["do_run_migrations"])
            await conn.rollback()
        assert env.migrations_run == 1
        assert len(ran) == len(blocks("python")) - 1
