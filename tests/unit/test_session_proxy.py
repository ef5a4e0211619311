"""WriteSession against AsyncSession: every coroutine method of AsyncSession is
either guarded (declared on WriteSession with AsyncSession's own signature, and
run through the write's call function) or left alone on purpose, with the reason.

A SQLAlchemy release that adds a coroutine method to AsyncSession, or changes
the signature of one WriteSession guards, fails here until WriteSession follows.
The calls run on a real SQLite file; only the call function is a stand-in, one
that records what it is given and runs it.
"""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from writeturn import TransactionOwnedError, WriteSession

T = TypeVar("T")

#: Methods that send statements: WriteSession runs each through its call function.
GUARDED = frozenset(
    {
        "connection",
        "delete",
        "delete_all",
        "execute",
        "flush",
        "get",
        "get_one",
        "merge",
        "merge_all",
        "refresh",
        "run_sync",
        "scalar",
        "scalars",
        "stream",
        "stream_scalars",
    }
)

#: The other coroutine methods of AsyncSession, each with why it is not guarded.
UNGUARDED = {
    "commit": "refused: raises TransactionOwnedError before any database call",
    "rollback": "refused: raises TransactionOwnedError before any database call",
    "close": "sends no statement: the session lets go of a transaction writeturn owns",
    "aclose": "close() under the name contextlib.aclosing() looks for",
    "reset": "close() that also returns the session to its initial state",
    "invalidate": "throws the write's connection away on purpose: nothing to let finish",
    "close_all": "a deprecated classmethod that closes every session, not a call on this one",
    "__aenter__": "returns the session itself; no database call",
    "__aexit__": "close() (see above)",
}


def coroutine_methods() -> set[str]:
    return {
        name
        for name in dir(AsyncSession)
        if inspect.iscoroutinefunction(getattr(AsyncSession, name, None))
    }


def test_every_coroutine_method_of_async_session_is_guarded_or_listed() -> None:
    found = coroutine_methods()
    assert not GUARDED & UNGUARDED.keys()
    assert found - GUARDED - UNGUARDED.keys() == set(), (
        "AsyncSession has coroutine methods WriteSession neither guards nor lists as unguarded"
    )
    assert (GUARDED | UNGUARDED.keys()) - found == set(), "listed, but not in AsyncSession"


# -- declared with AsyncSession's signatures ----------------------------------------------


class _OneSpelling(ast.NodeTransformer):
    """One spelling of each type: ``Optional[X]`` as ``X | None``, ``Union[A, B]`` as
    ``A | B``, ``Unpack[Ts]`` as ``*Ts``, and ``G[X]`` as ``G[X,]`` (the same to typing)."""

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        node = typing.cast(ast.Subscript, self.generic_visit(node))
        if isinstance(node.value, ast.Name) and node.value.id == "Unpack":
            return ast.Starred(node.slice, ast.Load())
        if isinstance(node.value, ast.Name) and node.value.id in ("Optional", "Union"):
            parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if node.value.id == "Optional":
                parts = [*parts, ast.Constant(None)]
            joined = parts[0]
            for part in parts[1:]:
                joined = ast.BinOp(joined, ast.BitOr(), part)
            return joined
        if not isinstance(node.slice, ast.Tuple):
            node.slice = ast.Tuple([node.slice], ast.Load())
        return node


def _annotation(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    assert isinstance(annotation, str), annotation  # both modules postpone annotations
    return ast.dump(_OneSpelling().visit(ast.parse(annotation, mode="eval")))


def _signature(fn: Callable[..., Any]) -> tuple[object, ...]:
    """``fn``'s signature: names, kinds and defaults as they are; annotations spelled one way."""
    sig = inspect.signature(fn)
    params = tuple(
        (p.name, p.kind, p.default, _annotation(p.annotation)) for p in sig.parameters.values()
    )
    return params, _annotation(sig.return_annotation)


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_guarded_method_is_declared_with_async_session_signature(name: str) -> None:
    assert name in vars(WriteSession), f"WriteSession does not declare {name}()"
    ours, theirs = getattr(WriteSession, name), getattr(AsyncSession, name)
    assert inspect.iscoroutinefunction(ours)
    assert not hasattr(ours, "__wrapped__"), "the signature must be its own, not borrowed"
    assert _signature(ours) == _signature(theirs)
    assert [_signature(f) for f in typing.get_overloads(ours)] == [
        _signature(f) for f in typing.get_overloads(theirs)
    ]
    assert ours.__doc__ == theirs.__doc__


# -- run through the call function ---------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


def _count(session: Session, at_least: int) -> int:
    return int(session.scalar(select(func.count()).where(Item.id >= at_least)) or 0)


async def _all_of_stream(s: WriteSession) -> None:
    assert await (await s.stream(select(Item.id))).all()


async def _all_of_stream_scalars(s: WriteSession) -> None:
    assert await (await s.stream_scalars(select(Item.id))).all() == [1, 2, 3]


async def _refresh(s: WriteSession) -> None:
    item = await s.get_one(Item, 1)
    await s.refresh(item)


async def _delete(s: WriteSession) -> None:
    await s.delete(await s.get_one(Item, 1))


async def _delete_all(s: WriteSession) -> None:
    await s.delete_all([await s.get_one(Item, 1), await s.get_one(Item, 2)])


async def _flush(s: WriteSession) -> None:
    s.add(Item(id=4, name="d"))
    await s.flush()


#: One call of each guarded method.
CALLS: dict[str, Callable[[WriteSession], Awaitable[object]]] = {
    "connection": lambda s: s.connection(),
    "delete": _delete,
    "delete_all": _delete_all,
    "execute": lambda s: s.execute(select(Item.id)),
    "flush": _flush,
    "get": lambda s: s.get(Item, 1),
    "get_one": lambda s: s.get_one(Item, 1),
    "merge": lambda s: s.merge(Item(id=4, name="d")),
    "merge_all": lambda s: s.merge_all([Item(id=4, name="d"), Item(id=5, name="e")]),
    "refresh": _refresh,
    "run_sync": lambda s: s.run_sync(_count, 2),
    "scalar": lambda s: s.scalar(select(func.count()).select_from(Item)),
    "scalars": lambda s: s.scalars(select(Item.id)),
    "stream": _all_of_stream,
    "stream_scalars": _all_of_stream_scalars,
}


class Recorder:
    """A call function that notes each coroutine it is given, then runs it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    async def __call__(self, coro: Coroutine[Any, Any, T], *, interruptible: bool = True) -> T:
        self.seen.append((coro.__qualname__, interruptible))
        return await coro


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[tuple[WriteSession, Recorder]]:
    """A WriteSession as writeturn makes one: bound to a connection in a transaction."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(
                Item.__table__.insert(),
                [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
            )
        async with engine.connect() as conn:
            await conn.begin()
            recorder = Recorder()
            ws = WriteSession(
                recorder, bind=conn, expire_on_commit=False, join_transaction_mode="rollback_only"
            )
            try:
                yield ws, recorder
            finally:
                await ws.close()
                await conn.rollback()
    finally:
        await engine.dispose()


def test_every_guarded_method_has_a_call_here() -> None:
    assert CALLS.keys() == GUARDED


@pytest.mark.parametrize("name", sorted(GUARDED))
async def test_guarded_method_runs_through_the_call_function(
    name: str, session: tuple[WriteSession, Recorder]
) -> None:
    ws, recorder = session
    await CALLS[name](ws)
    assert (f"AsyncSession.{name}", True) in recorder.seen, recorder.seen


@pytest.mark.parametrize("name", ["commit", "rollback"])
async def test_commit_and_rollback_are_refused_without_a_database_call(
    name: str, session: tuple[WriteSession, Recorder]
) -> None:
    ws, recorder = session
    with pytest.raises(TransactionOwnedError):
        await getattr(ws, name)()
    assert recorder.seen == []
