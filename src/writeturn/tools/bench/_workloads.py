"""The workloads: the bench's own tables, the writes, and the invariant checks.

Every write, whatever the workload, inserts one row with its unique id into
``writeturn_bench_log`` in the same transaction, so the rows present after a
cell tell exactly which writes committed ("outcome truth").
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = [
    "Op",
    "Workload",
    "WORKLOAD_TABLE",
    "make_ops",
    "create_tables",
    "drop_tables",
    "check_invariants",
    "COUNTER_ROWS",
    "ACCOUNTS",
    "START_BALANCE",
]

COUNTER_ROWS = 4
ACCOUNTS = 100
START_BALANCE = 1000
MAX_AMOUNT = 10

metadata = MetaData()
log_table = Table(
    "writeturn_bench_log",
    metadata,
    Column("wid", Integer, primary_key=True, autoincrement=False),
    Column("writer", Integer, nullable=False),
    Column("payload", String(32), nullable=False),
)
counter_table = Table(
    "writeturn_bench_counter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", Integer, nullable=False),
)
account_table = Table(
    "writeturn_bench_account",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("balance", Integer, nullable=False),
)


@dataclass(slots=True)
class Op:
    """One write: its unique id, its writer, the writeturn key, and its arguments."""

    wid: int
    writer: int
    key: str
    a: int = 0
    b: int = 0
    amount: int = 0
    #: Set by a strategy that knows better than "the call returned" whether it committed.
    claim: bool | None = None


Apply = Callable[[AsyncSession, Op], Awaitable[None]]


async def _log(session: AsyncSession, op: Op) -> None:
    await session.execute(
        insert(log_table).values(wid=op.wid, writer=op.writer, payload=f"w{op.writer}:{op.wid}")
    )


async def apply_insert(session: AsyncSession, op: Op) -> None:
    """A single-row insert."""
    await _log(session, op)


async def apply_counter(session: AsyncSession, op: Op) -> None:
    """Read a hot counter, yield to the loop, write it back plus one."""
    value = await session.scalar(select(counter_table.c.value).where(counter_table.c.id == op.a))
    await asyncio.sleep(0)
    await session.execute(
        update(counter_table).where(counter_table.c.id == op.a).values(value=int(value or 0) + 1)
    )
    await _log(session, op)


async def apply_transfer(session: AsyncSession, op: Op) -> None:
    """Read two balances, yield to the loop, write both back with the amount moved."""
    bal = account_table.c.balance
    src = await session.scalar(select(bal).where(account_table.c.id == op.a))
    dst = await session.scalar(select(bal).where(account_table.c.id == op.b))
    await asyncio.sleep(0)
    where_a, where_b = account_table.c.id == op.a, account_table.c.id == op.b
    await session.execute(
        update(account_table).where(where_a).values(balance=int(src or 0) - op.amount)
    )
    await session.execute(
        update(account_table).where(where_b).values(balance=int(dst or 0) + op.amount)
    )
    await _log(session, op)


@dataclass(frozen=True)
class Workload:
    name: str
    apply: Apply


WORKLOAD_TABLE: dict[str, Workload] = {
    "insert": Workload("insert", apply_insert),
    "counter": Workload("counter", apply_counter),
    "transfer": Workload("transfer", apply_transfer),
}


def make_ops(workload: str, writers: int, per_writer: int, rng: random.Random) -> list[list[Op]]:
    """Each writer's writes, in submission order; ids are unique within the cell.

    writeturn keys: ``insert`` one key for the table; ``counter`` one key per
    row; ``transfer`` one ``bank`` key, since a transfer touches two accounts
    and a key per account (or the lower id) would not exclude a transfer
    sharing only its other account.
    """
    out: list[list[Op]] = []
    wid = 0
    for w in range(writers):
        ops: list[Op] = []
        for _ in range(per_writer):
            wid += 1
            ops.append(_make_op(workload, wid, w, rng))
        out.append(ops)
    return out


def _make_op(workload: str, wid: int, writer: int, rng: random.Random) -> Op:
    if workload == "counter":
        row = rng.randrange(COUNTER_ROWS)
        return Op(wid, writer, f"counter:{row}", a=row)
    if workload == "transfer":
        a, b = rng.sample(range(ACCOUNTS), 2)
        return Op(wid, writer, "bank", a=a, b=b, amount=rng.randint(1, MAX_AMOUNT))
    return Op(wid, writer, "insert")


async def create_tables(conn: AsyncConnection) -> None:
    """Fresh tables: dropped if left over, created, seeded."""
    await conn.run_sync(metadata.drop_all)
    await conn.run_sync(metadata.create_all)
    await conn.execute(insert(counter_table), [{"id": i, "value": 0} for i in range(COUNTER_ROWS)])
    await conn.execute(
        insert(account_table), [{"id": i, "balance": START_BALANCE} for i in range(ACCOUNTS)]
    )


async def drop_tables(conn: AsyncConnection) -> None:
    await conn.run_sync(metadata.drop_all)


@dataclass(frozen=True)
class Invariants:
    present: frozenset[int]
    lost_updates: int


async def check_invariants(conn: AsyncConnection, workload: str) -> Invariants:
    """Which write ids committed, and how many updates were lost."""
    present = frozenset(int(w) for w in (await conn.scalars(select(log_table.c.wid))).all())
    lost = 0
    if workload == "counter":
        total = await conn.scalar(select(func.coalesce(func.sum(counter_table.c.value), 0)))
        lost = len(present) - int(total or 0)
    elif workload == "transfer":
        total = await conn.scalar(select(func.coalesce(func.sum(account_table.c.balance), 0)))
        lost = abs(int(total or 0) - ACCOUNTS * START_BALANCE)
    return Invariants(present, lost)
