"""The engine of one short run (a migration, the doctor's checks): no pool, named for
``pg_stat_activity``, the URL's libpq parameters mapped onto asyncpg's."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ._sqlite_connect import join_failed_connects
from .urls import backend_of, engine_options

__all__ = ["unpooled_engine"]


def unpooled_engine(url: URL, postgres_connect_args: dict[str, Any]) -> AsyncEngine:
    """A ``NullPool`` engine for the normalized ``url``: every connection is closed when
    returned, so none outlives the run. ``postgres_connect_args`` (the application
    name, timeouts) apply on Postgres only; on SQLite a connect that fails does not
    leave its thread behind."""
    backend = backend_of(url)
    options: dict[str, Any] = {"poolclass": NullPool}
    if backend == "postgresql":
        options["connect_args"] = postgres_connect_args
    stripped, mapped = engine_options(url, options)
    engine = create_async_engine(stripped, **mapped)
    if backend == "sqlite":
        join_failed_connects(engine)
    return engine
