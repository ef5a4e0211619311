"""The one engine factory: the library, its migrations, the doctor and the bench's
baselines get the same URL mapping and the same naming of a bad option."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from writeturn import WriteSerializer, migrations
from writeturn._engines import SqlitePragmas, create_engine, unpooled_engine
from writeturn.errors import ConfigurationError, UnsupportedDatabase
from writeturn.tools import doctor
from writeturn.tools.bench._strategies import Database, make_engine
from writeturn.urls import normalize_url

SECRET = "pw_s3cret"
LIBPQ = (
    f"postgresql://app:{SECRET}@127.0.0.1:1/db"
    "?sslmode=require&application_name=svc&connect_timeout=3&dbname=db"
)


class Captured(Exception):
    """Raised by the do_connect hook once it has seen what the driver would get."""

    def __init__(self, cparams: dict[str, Any]) -> None:
        super().__init__("captured")
        self.cparams = cparams


async def connect_params(engine: AsyncEngine) -> dict[str, Any]:
    """What the engine would pass the driver's connect(), without connecting."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _capture(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        raise Captured(dict(cparams))

    try:
        with pytest.raises(Captured) as info:
            await engine.connect()
    finally:
        await engine.dispose()
    return {k: v for k, v in info.value.cparams.items() if k != "async_creator_fn"}


def _serializer_engine(url: str) -> AsyncEngine:
    return WriteSerializer.from_url(url).engine


def _bench_engine(url: str) -> AsyncEngine:
    return make_engine(Database("postgresql", normalize_url(url), "postgresql", None))


ENGINES: dict[str, Callable[[str], AsyncEngine]] = {
    "factory": create_engine,
    "serializer": _serializer_engine,
    "bench": _bench_engine,
}


@pytest.mark.parametrize("made_by", sorted(ENGINES))
async def test_every_engine_maps_the_urls_libpq_parameters_alike(made_by: str) -> None:
    params = await connect_params(ENGINES[made_by](LIBPQ))
    assert params["ssl"] == "require"
    assert params["timeout"] == 3.0
    assert params["server_settings"] == {"application_name": "svc"}
    assert params["database"] == "db"
    assert not {"sslmode", "application_name", "connect_timeout", "dbname"} & set(params)


async def test_the_short_run_engines_map_the_url_too_and_keep_their_own_names() -> None:
    params = await connect_params(migrations._create_engine(LIBPQ))
    assert params["ssl"] == "require" and params["timeout"] == 3.0
    assert params["server_settings"] == {"application_name": "writeturn-migrate"}
    doctor_params = await connect_params(doctor._engine(normalize_url(LIBPQ)))
    assert doctor_params["ssl"] == "require"
    assert doctor_params["server_settings"]["application_name"] == doctor.APPLICATION_NAME


def test_an_unpooled_engine_has_no_pool_and_the_default_one_has() -> None:
    url = normalize_url("postgresql://app@127.0.0.1:1/db")
    assert isinstance(create_engine(url, pooled=False).pool, NullPool)
    assert isinstance(unpooled_engine(url, {}).pool, NullPool)
    assert not isinstance(create_engine(url).pool, NullPool)


@pytest.mark.parametrize("pooled", [True, False])
def test_a_bad_option_is_named_on_every_path(pooled: bool) -> None:
    with pytest.raises(ConfigurationError, match=r"engine option pool_sise=5") as info:
        create_engine(LIBPQ, {"pool_sise": 5}, pooled=pooled)
    assert SECRET not in str(info.value)


def test_a_url_refused_on_its_own_is_named_on_the_short_run_path_too() -> None:
    url = f"postgresql://app:{SECRET}@127.0.0.1:1/db?prepared_statement_cache_size=x"
    with pytest.raises(UnsupportedDatabase, match="database URL") as info:
        migrations._create_engine(url)
    assert SECRET not in str(info.value) and "engine option" not in str(info.value)


async def test_sqlite_pragmas_are_set_only_when_asked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"

    async def journal_mode(engine: AsyncEngine) -> str:
        try:
            async with engine.connect() as conn:
                mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
                await conn.rollback()
        finally:
            await engine.dispose()
        return str(mode)

    # The doctor reads the file as it is: its engine must not switch it to WAL.
    assert await journal_mode(unpooled_engine(normalize_url(url), {"timeout": 1})) == "delete"
    assert await journal_mode(create_engine(url, sqlite_pragmas=SqlitePragmas("FULL", 1))) == "wal"


def test_pgbouncer_applies_to_postgres_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="pgbouncer=True applies to Postgres URLs"):
        create_engine(f"sqlite:///{tmp_path / 'app.db'}", pgbouncer=True)


def test_a_bad_sqlite_pragma_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a SQLite synchronous level"):
        create_engine(f"sqlite:///{tmp_path / 'app.db'}", sqlite_pragmas=SqlitePragmas("x", 1))
