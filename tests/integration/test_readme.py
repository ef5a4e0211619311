"""The README runs: its first example as a pasted script, every other Python block in
order against a real database (SQLite, and Postgres), and its command lines against the
real command-line tools.

The blocks share one namespace, as in a reader's session, and may use these names
without defining them: ``url`` and ``DATABASE_URL`` (the test database, whose
``accounts`` table has account 42), ``engine`` (an AsyncEngine on it), ``fn``, ``args``,
``kwargs``, ``deposit`` and ``charge`` (write functions), ``order_id``, ``request_id``,
``routes``, and, for the env.py snippets, ``connection``, ``target_metadata`` and
``context`` (a recorder of what env.py would give Alembic).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from writeturn import Outcome
from writeturn.alembic_env import include_name, include_object

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, dedented code) of every fenced block in ``lang``."""
    text_ = README.read_text()
    found = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text_, re.S | re.M):
        if m.group(2) == lang:
            line = text_[: m.start()].count("\n") + 1
            found.append((line, textwrap.dedent(m.group(3))))
    return found


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


class Env:
    """What an env.py's ``context`` receives, recorded."""

    def __init__(self) -> None:
        self.configured: dict[str, Any] = {}
        self.migrations_run = 0

    def configure(self, **options: Any) -> None:
        self.configured.update(options)

    def begin_transaction(self) -> nullcontext[None]:
        return nullcontext()

    def run_migrations(self) -> None:
        self.migrations_run += 1


async def test_every_python_block_runs(db_url: str, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may name sqlite:///app.db
    engine = create_async_engine(db_url)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)"
        )
        await conn.exec_driver_sql("INSERT INTO accounts VALUES (42, 100)")

    async def deposit(session: AsyncSession, account: int, amount: int) -> int:
        await session.execute(
            text("UPDATE accounts SET balance = balance + :a WHERE id = :id"),
            {"a": amount, "id": account},
        )
        return amount

    async def charge(session: AsyncSession, order: int) -> str:
        await deposit(session, 42, order)
        return f"charged {order}"

    env = Env()
    ns: dict[str, Any] = {
        "__name__": "readme",
        "url": db_url,
        "DATABASE_URL": db_url,
        "engine": engine,
        "fn": deposit,
        "args": (42, 10),
        "kwargs": {},
        "deposit": deposit,
        "charge": charge,
        "order_id": 7,
        "request_id": "r-1",
        "routes": [],
        "context": env,
        "connection": None,
        "target_metadata": None,
    }
    ran = []
    try:
        for line, code in blocks("python")[1:]:
            compiled = compile(code, f"README.md:{line}", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            try:
                if compiled.co_flags & inspect.CO_COROUTINE:
                    await eval(compiled, ns)
                else:  # a synchronous block may start its own event loop (asyncio.run)
                    await asyncio.to_thread(exec, compiled, ns)
            except Exception as exc:
                raise AssertionError(f"the README block at line {line} failed: {exc!r}") from exc
            ran.append(line)

        # What the blocks did, checked against the database and the recorder.
        handle = ns["handle"]  # the journal block's write
        assert handle.outcome is Outcome.COMMITTED and handle.seq == 1
        assert not handle.duplicate
        assert ns["result"] == 10  # the API block's run(fn, *args)
        async with engine.connect() as conn:
            balance = (
                await conn.execute(text("SELECT balance FROM accounts WHERE id = 42"))
            ).scalar_one()
        # 100, +10 submit, +10 run, -1 in a transaction() block, +7 the charge
        assert balance == 126
        assert env.configured["include_name"] is include_name
        assert env.configured["include_object"] is include_object
        # The migration lock snippet, run on a real connection.
        async with engine.connect() as conn:
            await conn.run_sync(ns["do_run_migrations"])
            await conn.rollback()
        assert env.migrations_run == 1
        assert len(ran) == len(blocks("python")) - 1
    finally:
        await engine.dispose()


def _flags_of(line: str) -> list[str]:
    return re.findall(r"(--[a-z][a-z-]*)", line.split("#")[0])


@pytest.mark.parametrize(
    "line",
    [ln for _, code in blocks("sh") for ln in code.splitlines() if ln.startswith("writeturn ")],
)
def test_the_command_lines_match_the_tools(line: str) -> None:
    words = line.split("#")[0].split()
    command = words[1]
    if command == "--version":
        args = [command]
    else:
        args = [command, "--help"]
    done = subprocess.run(
        [sys.executable, "-m", "writeturn", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if command == "--version":
        assert re.fullmatch(r"writeturn \S+\n", done.stdout), done.stdout
        return
    if command == "migrate":  # its actions, then each action's flags
        actions = re.findall(r"\b(upgrade|downgrade|current|history)\b", line)
        assert actions
        for action in actions:
            sub = subprocess.run(
                [sys.executable, "-m", "writeturn", "migrate", action, "--help"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert sub.returncode == 0, sub.stderr
            for flag in _flags_of(line):
                assert flag in sub.stdout, (action, flag)
        return
    for flag in _flags_of(line):
        assert flag in done.stdout, flag


def test_the_alembic_line_runs_from_the_repository_root(tmp_path: Path) -> None:
    (line,) = [
        ln for _, code in blocks("sh") for ln in code.splitlines() if ln.startswith("alembic")
    ]
    words = line.split("#")[0].split()
    db = tmp_path / "app.db"
    words = [w.replace("sqlite:///app.db", f"sqlite:///{db}") for w in words]
    alembic = Path(sys.executable).with_name("alembic")
    done = subprocess.run(
        [str(alembic), *words[1:]],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert db.exists()
