"""The one engine factory: every engine the library, its migrations and its tools create.

One path means one answer to each question an engine raises: the URL is
normalized and its libpq parameters mapped onto asyncpg's (so connections are
named in ``pg_stat_activity``), a bad engine option is named in a
:class:`ConfigurationError`, a failed SQLite connect does not leave its thread
behind, and SQLite gets the pragmas writeturn relies on when asked. The
benchmark's baselines get their engines here too, so they connect exactly as
writeturn's own strategies do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ._sqlite_connect import join_failed_connects
from .dialects import configure_sqlite_engine, for_transaction_pooler
from .errors import ConfigurationError, UnsupportedDatabase, shown
from .urls import backend_of, describe_error, engine_options, normalize_url, redact

__all__ = ["SqlitePragmas", "create_engine", "unpooled_engine"]


class SqlitePragmas(NamedTuple):
    """The pragmas every connection of a SQLite engine gets (WAL and foreign keys too)."""

    synchronous: str
    busy_timeout: float


def create_engine(
    url: str | URL,
    options: Mapping[str, Any] | None = None,
    *,
    pooled: bool = True,
    pgbouncer: bool = False,
    sqlite_pragmas: SqlitePragmas | None = None,
) -> AsyncEngine:
    """An engine for ``url`` with the engine ``options`` of ``create_async_engine``.

    The URL is normalized and its libpq parameters mapped (:func:`urls.engine_options`).
    ``pooled=False`` gives a ``NullPool`` engine: every connection is closed when
    returned, so none outlives a short run. ``pgbouncer=True`` (Postgres only) makes
    the engine safe behind a pooler in transaction mode. On SQLite, a connect that
    fails ends its thread, and ``sqlite_pragmas``, if given, are set on every
    connection (they are ignored on Postgres). Raises :class:`ConfigurationError`
    naming a bad option, :class:`UnsupportedDatabase` for a URL refused as it is.
    """
    parsed = normalize_url(url)
    backend = backend_of(parsed)
    given = dict(options or {})
    if not pooled:
        given["poolclass"] = NullPool
    parsed, given = engine_options(parsed, given)
    if pgbouncer:
        if backend != "postgresql":
            raise ConfigurationError(
                f"pgbouncer=True applies to Postgres URLs, and {redact(parsed)} is "
                f"{backend}; drop the option"
            )
        parsed, given = for_transaction_pooler(parsed, given)
    engine = _create(parsed, given)
    if backend == "sqlite":
        try:
            join_failed_connects(engine)
            if sqlite_pragmas is not None:
                configure_sqlite_engine(
                    engine,
                    synchronous=sqlite_pragmas.synchronous,
                    busy_timeout=sqlite_pragmas.busy_timeout,
                )
        except BaseException:
            engine.sync_engine.dispose()  # no connection was made yet
            raise
    return engine


def unpooled_engine(url: str | URL, postgres_connect_args: dict[str, Any]) -> AsyncEngine:
    """The engine of one short run (a migration, the doctor's checks): a ``NullPool``
    engine for ``url``, with ``postgres_connect_args`` (the application name,
    timeouts) on Postgres only."""
    postgres = backend_of(normalize_url(url)) == "postgresql"
    options = {"connect_args": postgres_connect_args} if postgres else {}
    return create_engine(url, options, pooled=False)


def _create(url: URL, options: dict[str, Any]) -> AsyncEngine:
    """``create_async_engine(url, **options)``, with a bad option named in a ConfigurationError.

    SQLAlchemy refuses a bad option with whatever its code happens to raise
    (TypeError, KeyError, ValueError, ...), often without naming it. A URL refused
    even without options (a query parameter of a wrong type) is named instead.
    """
    try:
        return create_async_engine(url, **options)
    except Exception as exc:
        error = exc
    if not _engine_accepts(url, {}):
        raise UnsupportedDatabase(
            f"SQLAlchemy refused the database URL {redact(url)!r} "
            f"({describe_error(error, url)}); check its port and query parameters"
        ) from None
    culprits = [name for name in options if not _engine_accepts(url, {name: options[name]})]
    if not culprits:  # each is fine alone: name those the error names, else all of them
        culprits = [name for name in options if repr(name) in str(error)] or list(options)
    named = ", ".join(_option(name, options[name]) for name in culprits)
    message = (
        f"create_async_engine() refused the engine option{'s' if len(culprits) > 1 else ''} "
        f"{named} ({describe_error(error, url)}); check the option's name and type against "
        "SQLAlchemy's create_engine() documentation (e.g. pool_size=10, "
        "connect_args={'timeout': 2}), or drop it"
    )
    for secret in _secrets(options):  # a password passed beside the bad option
        message = message.replace(secret, "***")
    raise ConfigurationError(message) from None


def _engine_accepts(url: URL, options: dict[str, Any]) -> bool:
    try:
        engine = create_async_engine(url, **options)
    except Exception:
        return False
    engine.sync_engine.dispose()  # no connection was made: this only drops the empty pool
    return True


_SECRET_NAMES = ("password", "passwd", "secret", "token", "pwd")


def _option(name: str, value: object) -> str:
    """``name=value`` for a message; a value that may hold a secret shows only its type."""
    if isinstance(value, bool | int | float | str | None) and not any(
        part in name.lower() for part in _SECRET_NAMES
    ):
        return f"{name}={shown(value)}"
    return f"{name} (a {type(value).__name__})"


def _secrets(options: dict[str, Any]) -> list[str]:
    """String values under secret-looking names, at any depth of ``options`` (e.g. connect_args)."""
    found: list[str] = []
    for name, value in options.items():
        if isinstance(value, dict):
            found += _secrets({str(k): v for k, v in value.items()})
        elif isinstance(value, str) and value and any(p in name.lower() for p in _SECRET_NAMES):
            found.append(value)
    return found
