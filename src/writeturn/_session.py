"""The session a write function receives: an AsyncSession whose database calls
cannot be cut in half by a cancellation.

Each guarded method runs through the ``call`` function it was given: the
statement completes (or, after a grace period, is interrupted by the driver
and fails with an ordinary error), and only then does the cancellation reach
the write function, as ``CancelledError``. The connection therefore stays
usable and is rolled back and returned to the pool, not terminated.

Savepoints from ``begin_nested()`` are guarded too: SAVEPOINT like a
statement, and RELEASE or ROLLBACK TO always run to the end.

Not guarded: iterating a server-side result from ``stream()``, and calls made
on the raw connection from ``session.connection()``. A cancellation landing
there is still safe (the connection is invalidated and the database rolls the
transaction back) but costs a reconnect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Never,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
    TypeVarTuple,
    overload,
)

from sqlalchemy import util
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

from .errors import TransactionOwnedError

if TYPE_CHECKING:
    from sqlalchemy.engine import Result, ScalarResult
    from sqlalchemy.engine.interfaces import CoreExecuteOptionsParameter, _CoreAnyExecuteParams
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncResult, AsyncScalarResult
    from sqlalchemy.orm import Session
    from sqlalchemy.orm._typing import _O, OrmExecuteOptionsParameter
    from sqlalchemy.orm.interfaces import ORMOption
    from sqlalchemy.orm.session import _BindArguments, _EntityBindKey, _PKIdentityArgument
    from sqlalchemy.sql.base import Executable
    from sqlalchemy.sql.selectable import ForUpdateParameter, TypedReturnsRows
    from sqlalchemy.util.typing import TupleAny

__all__ = ["WriteSession", "Call"]

# Named as in SQLAlchemy's AsyncSession, whose signatures WriteSession repeats.
_P = ParamSpec("_P")
_T = TypeVar("_T", bound=Any)
_Ts = TypeVarTuple("_Ts")
_R = TypeVar("_R")
_F = TypeVar("_F", bound=Callable[..., Any])


class Call(Protocol):
    """Runs one database call of the write so that no cancellation lands inside it;
    ``interruptible=False`` for calls that must finish (the end of a savepoint)."""

    def __call__(
        self, coro: Coroutine[Any, Any, _R], /, *, interruptible: bool = ...
    ) -> Awaitable[_R]: ...


def _doc_of(base: Callable[..., Any]) -> Callable[[_F], _F]:
    """Give the decorated method ``base``'s docstring: it does what ``base`` does."""

    def apply(method: _F) -> _F:
        method.__doc__ = base.__doc__
        return method

    return apply


class WriteSession(AsyncSession):
    """An AsyncSession in one writeturn transaction: cancellations land only between statements.

    writeturn owns the transaction: it commits when the write function returns
    and rolls back when it raises. ``commit()`` and ``rollback()`` therefore
    raise :class:`TransactionOwnedError`; use ``begin_nested()`` for a
    savepoint. Not safe for use from concurrent tasks (like any AsyncSession), and
    refused (:class:`TransactionOwnedError`) once its write has ended.
    """

    _writeturn_call: Call

    def __init__(self, call: Call, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._writeturn_call = call

    # The guarded methods: each has AsyncSession's signature, overloads and docstring,
    # and runs AsyncSession's own through the call function. The unit test
    # tests/unit/test_session_proxy.py lists AsyncSession's other coroutine methods,
    # each with why it is left alone, and fails on one that is in neither list.

    @_doc_of(AsyncSession.refresh)
    async def refresh(
        self,
        instance: object,
        attribute_names: Iterable[str] | None = None,
        with_for_update: ForUpdateParameter = None,
    ) -> None:
        return await self._writeturn_call(
            super().refresh(instance, attribute_names, with_for_update)
        )

    @_doc_of(AsyncSession.run_sync)
    async def run_sync(
        self,
        fn: Callable[Concatenate[Session, _P], _T],
        *arg: _P.args,
        **kw: _P.kwargs,
    ) -> _T:
        return await self._writeturn_call(super().run_sync(fn, *arg, **kw))

    @overload
    async def execute(
        self,
        statement: TypedReturnsRows[*_Ts],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        _parent_execute_state: Any | None = None,
        _add_event: Any | None = None,
    ) -> Result[*_Ts]: ...

    @overload
    async def execute(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        _parent_execute_state: Any | None = None,
        _add_event: Any | None = None,
    ) -> Result[*TupleAny]: ...

    @_doc_of(AsyncSession.execute)
    async def execute(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> Result[*TupleAny]:
        return await self._writeturn_call(
            super().execute(
                statement,
                params,
                execution_options=execution_options,
                bind_arguments=bind_arguments,
                **kw,
            )
        )

    # mypy rejects this first overload, though it is AsyncSession's own: a false
    # positive of its override check where an overload takes TypedReturnsRows[Never].
    @overload  # type: ignore[override]
    async def scalar(
        self,
        statement: TypedReturnsRows[Never],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> Any | None: ...

    @overload
    async def scalar(
        self,
        statement: TypedReturnsRows[_T],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> _T | None: ...

    @overload
    async def scalar(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> Any: ...

    @_doc_of(AsyncSession.scalar)
    async def scalar(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> Any:
        return await self._writeturn_call(
            super().scalar(
                statement,
                params,
                execution_options=execution_options,
                bind_arguments=bind_arguments,
                **kw,
            )
        )

    @overload
    async def scalars(
        self,
        statement: TypedReturnsRows[_T],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ScalarResult[_T]: ...

    @overload
    async def scalars(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ScalarResult[Any]: ...

    @_doc_of(AsyncSession.scalars)
    async def scalars(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ScalarResult[Any]:
        return await self._writeturn_call(
            super().scalars(
                statement,
                params,
                execution_options=execution_options,
                bind_arguments=bind_arguments,
                **kw,
            )
        )

    @_doc_of(AsyncSession.get)
    async def get(
        self,
        entity: _EntityBindKey[_O],
        ident: _PKIdentityArgument,
        *,
        options: Sequence[ORMOption] | None = None,
        populate_existing: bool | None = None,
        with_for_update: ForUpdateParameter = None,
        identity_token: Any | None = None,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
    ) -> _O | None:
        # Made apart from the call: in one expression mypy would take the result's
        # ``_O | None`` for AsyncSession.get's ``_O``.
        coro = super().get(
            entity,
            ident,
            options=options,
            populate_existing=populate_existing,
            with_for_update=with_for_update,
            identity_token=identity_token,
            execution_options=execution_options,
        )
        return await self._writeturn_call(coro)

    @_doc_of(AsyncSession.get_one)
    async def get_one(
        self,
        entity: _EntityBindKey[_O],
        ident: _PKIdentityArgument,
        *,
        options: Sequence[ORMOption] | None = None,
        populate_existing: bool | None = None,
        with_for_update: ForUpdateParameter = None,
        identity_token: Any | None = None,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
    ) -> _O:
        return await self._writeturn_call(
            super().get_one(
                entity,
                ident,
                options=options,
                populate_existing=populate_existing,
                with_for_update=with_for_update,
                identity_token=identity_token,
                execution_options=execution_options,
            )
        )

    @overload
    async def stream(
        self,
        statement: TypedReturnsRows[*_Ts],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> AsyncResult[*_Ts]: ...

    @overload
    async def stream(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> AsyncResult[*TupleAny]: ...

    @_doc_of(AsyncSession.stream)
    async def stream(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> AsyncResult[*TupleAny]:
        return await self._writeturn_call(
            super().stream(
                statement,
                params,
                execution_options=execution_options,
                bind_arguments=bind_arguments,
                **kw,
            )
        )

    @overload
    async def stream_scalars(
        self,
        statement: TypedReturnsRows[_T],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> AsyncScalarResult[_T]: ...

    @overload
    async def stream_scalars(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> AsyncScalarResult[Any]: ...

    @_doc_of(AsyncSession.stream_scalars)
    async def stream_scalars(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: OrmExecuteOptionsParameter = util.EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> AsyncScalarResult[Any]:
        return await self._writeturn_call(
            super().stream_scalars(
                statement,
                params,
                execution_options=execution_options,
                bind_arguments=bind_arguments,
                **kw,
            )
        )

    @_doc_of(AsyncSession.delete)
    async def delete(self, instance: object) -> None:
        return await self._writeturn_call(super().delete(instance))

    @_doc_of(AsyncSession.delete_all)
    async def delete_all(self, instances: Iterable[object]) -> None:
        return await self._writeturn_call(super().delete_all(instances))

    @_doc_of(AsyncSession.merge)
    async def merge(
        self,
        instance: _O,
        *,
        load: bool = True,
        options: Sequence[ORMOption] | None = None,
    ) -> _O:
        return await self._writeturn_call(super().merge(instance, load=load, options=options))

    @_doc_of(AsyncSession.merge_all)
    async def merge_all(
        self,
        instances: Iterable[_O],
        *,
        load: bool = True,
        options: Sequence[ORMOption] | None = None,
    ) -> Sequence[_O]:
        return await self._writeturn_call(super().merge_all(instances, load=load, options=options))

    @_doc_of(AsyncSession.flush)
    async def flush(self, objects: Sequence[Any] | None = None) -> None:
        return await self._writeturn_call(super().flush(objects))

    @_doc_of(AsyncSession.connection)
    async def connection(
        self,
        bind_arguments: _BindArguments | None = None,
        execution_options: CoreExecuteOptionsParameter | None = None,
        **kw: Any,
    ) -> AsyncConnection:
        return await self._writeturn_call(
            super().connection(bind_arguments, execution_options, **kw)
        )

    async def commit(self) -> NoReturn:
        """Refused: writeturn commits when the write function returns."""
        raise TransactionOwnedError(
            "session.commit() inside a writeturn write: writeturn commits when your function "
            "returns (or the `async with` block exits cleanly); remove the commit() call, or "
            "use `await session.flush()` to send pending changes now"
        )

    def begin_nested(self) -> AsyncSessionTransaction:
        """A SAVEPOINT: ``async with session.begin_nested():`` rolls back only its block
        when the block raises. Its end (RELEASE or ROLLBACK TO) is never cut by a
        cancellation."""
        return _Savepoint(self, nested=True)

    async def rollback(self) -> NoReturn:
        """Refused: raise an exception to roll the write back."""
        raise TransactionOwnedError(
            "session.rollback() inside a writeturn write: raise an exception from your function "
            "(or the `async with` block) to roll the write back; use `session.begin_nested()` "
            "for a savepoint you can roll back on its own"
        )


class _Savepoint(AsyncSessionTransaction):
    """A savepoint whose statements go through the write's call function."""

    session: WriteSession

    async def start(self, is_ctxmanager: bool = False) -> AsyncSessionTransaction:
        result: AsyncSessionTransaction = await self.session._writeturn_call(
            super().start(is_ctxmanager)
        )
        return result

    async def commit(self) -> None:
        await self.session._writeturn_call(super().commit(), interruptible=False)

    async def rollback(self) -> None:
        await self.session._writeturn_call(super().rollback(), interruptible=False)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        await self.session._writeturn_call(
            super().__aexit__(type_, value, traceback), interruptible=False
        )
