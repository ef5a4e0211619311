"""Fenced code blocks of the Markdown documentation (the README, the pages under docs/), the
site's pages in the order of its navigation, and the runner that executes their Python
blocks against a real database.

The blocks of one document share one namespace, as in a reader's session, and may use
these names without defining them: ``url`` and ``DATABASE_URL`` (the test database,
whose ``accounts`` table has account 42 with a balance of 100), ``engine`` (an
AsyncEngine on it), ``fn``, ``args``, ``kwargs``, ``deposit`` and ``charge`` (write
functions: ``deposit(session, account, amount)`` adds to a balance, ``charge(session,
order)`` deposits ``order`` on account 42), ``order_id``, ``request_id``, ``routes``,
and, for the env.py snippets, ``connection``, ``target_metadata`` and ``context`` (a
recorder of what env.py would give Alembic).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import textwrap
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)


def nav_pages() -> list[str]:
    """The Markdown files the navigation lists, in its order."""
    found: list[str] = []

    def walk(items: list[Any]) -> None:
        for item in items:
            for value in item.values() if isinstance(item, dict) else [item]:
                if isinstance(value, list):
                    walk(value)
                else:
                    found.append(value)

    walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    return found


PAGES = nav_pages()


def guarantee_names(path: Path) -> list[str]:
    """The bold names of a page's numbered guarantees, in order."""
    found = re.findall(r"^\d+\. \*\*(.+?)\*\*", path.read_text(), re.M)
    return [name.rstrip(".") for name in found]


def blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """(line number, dedented code) of every fenced block in ``lang`` in ``path``."""
    text_ = path.read_text()
    found = []
    for m in FENCE.finditer(text_):
        if m.group(2) == lang:
            line = text_[: m.start()].count("\n") + 1
            found.append((line, textwrap.dedent(m.group(3))))
    return found


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


async def deposit(session: AsyncSession, account: int, amount: int) -> int:
    await session.execute(
        text("UPDATE accounts SET balance = balance + :a WHERE id = :id"),
        {"a": amount, "id": account},
    )
    return amount


async def charge(session: AsyncSession, order: int) -> str:
    await deposit(session, 42, order)
    return f"charged {order}"


@asynccontextmanager
async def reader_namespace(db_url: str, name: str) -> AsyncIterator[dict[str, Any]]:
    """The names the blocks may use, on ``db_url`` with account 42 (balance 100); the
    engine is disposed afterwards."""
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)"
            )
            await conn.exec_driver_sql("INSERT INTO accounts VALUES (42, 100)")
        yield {
            "__name__": name,
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
            "context": Env(),
            "connection": None,
            "target_metadata": None,
        }
    finally:
        await engine.dispose()


async def run_blocks(
    found: Iterable[tuple[int, str]], ns: dict[str, Any], source: str
) -> list[int]:
    """Run each block in order in ``ns``; the line numbers of those that ran. A failing
    block raises AssertionError naming ``source`` and its line."""
    ran = []
    for line, code in found:
        compiled = compile(code, f"{source}:{line}", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        try:
            if compiled.co_flags & inspect.CO_COROUTINE:
                await eval(compiled, ns)
            else:  # a synchronous block may start its own event loop (asyncio.run)
                await asyncio.to_thread(exec, compiled, ns)
        except Exception as exc:
            raise AssertionError(f"the block at {source}:{line} failed: {exc!r}") from exc
        ran.append(line)
    return ran


async def balance_of(ns: dict[str, Any], account: int = 42) -> int:
    """Account ``account``'s balance, read through the namespace's engine."""
    async with ns["engine"].connect() as conn:
        result = await conn.execute(
            text("SELECT balance FROM accounts WHERE id = :id"), {"id": account}
        )
        return int(result.scalar_one())
