"""Alembic environment for writeturn's own tables: async online runs under the migration lock.

One file serves two callers:

* the ``alembic`` command, run from the repository root with ``alembic.ini``;
  options come as ``alembic -x name=value``:

  - ``url``: database URL (else ``$WRITETURN_DATABASE_URL``, else
    ``sqlalchemy.url`` in ``alembic.ini``, a local SQLite file);
  - ``namespace``: namespace of the migration lock (default ``writeturn``);
  - ``lock_timeout``: seconds to wait for the migration lock (default 60);

* :mod:`writeturn.migrations`, which passes an open connection and the same
  settings in ``config.attributes`` (it has already taken the lock).

Every online run holds the migration lock from before the version table is
read until the last step is committed, so concurrent runs apply each revision
once: a run that waited re-reads the version table and applies only what is
missing. Offline (``--sql``) runs only print SQL and take no lock.

Test-only: ``$WRITETURN_MIGRATION_TEST_DELAY`` seconds of sleep after each
applied step, inside the lock and the open transaction, to make runs overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Collection, Mapping
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo
from sqlalchemy.engine import URL, Connection

from writeturn import migrations
from writeturn.errors import ConfigurationError
from writeturn.schema import VERSION_TABLE, metadata
from writeturn.urls import backend_of, normalize_url

config = context.config

# Only the alembic command has an ini file; a programmatic run leaves the
# application's logging alone. Existing loggers ("writeturn") stay enabled.
if config.config_file_name is not None and migrations.ATTR_CONNECTION not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata

log = logging.getLogger("writeturn")
x_args = context.get_x_argument(as_dictionary=True)


def database_url() -> URL:
    """The database of an ``alembic`` command run: -x url, then the environment, then the ini."""
    raw = (
        x_args.get("url")
        or os.environ.get(migrations.URL_ENV)
        or config.get_main_option("sqlalchemy.url")
    )
    if not raw:
        raise ConfigurationError(
            f"no database URL: pass -x url=URL, set {migrations.URL_ENV}, "
            "or set sqlalchemy.url in alembic.ini"
        )
    return normalize_url(raw)


def lock_settings() -> tuple[str, float]:
    """The migration lock's namespace and timeout: -x options, then attributes, then defaults."""
    namespace = x_args.get("namespace") or config.attributes.get(
        migrations.ATTR_NAMESPACE, migrations.DEFAULT_NAMESPACE
    )
    raw_timeout = x_args.get("lock_timeout")
    try:
        timeout = (
            float(raw_timeout)
            if raw_timeout is not None
            else float(
                config.attributes.get(migrations.ATTR_LOCK_TIMEOUT, migrations.DEFAULT_LOCK_TIMEOUT)
            )
        )
    except ValueError:
        raise ConfigurationError(
            f"-x lock_timeout must be a number of seconds, not {raw_timeout!r}"
        ) from None
    return str(namespace), timeout


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Compare only writeturn's tables: the database also holds the application's."""
    if type_ == "table":
        return name in target_metadata.tables
    return True


def on_version_apply(
    ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Mapping[str, Any]
) -> None:
    """Record the step for the programmatic caller; sleep if a test asked for it."""
    steps = config.attributes.get(migrations.ATTR_STEPS)
    if steps is not None:
        steps.append(step.up_revision_id)
    log.info("%s %s", "applied" if step.is_upgrade else "reverted", step.up_revision_id)
    delay = os.environ.get(migrations.TEST_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def configure_options(dialect_name: str) -> dict[str, Any]:
    """Options shared by online and offline runs."""
    return {
        "target_metadata": target_metadata,
        "version_table": VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        "render_as_batch": dialect_name == "sqlite",
        # Postgres DDL is transactional: one transaction for the whole run means
        # a failing step leaves the schema as it was.
        "transaction_per_migration": False,
        "include_name": include_name,
        "compare_type": True,
    }


def run_migrations_offline() -> None:
    """Emit the SQL of the migrations to stdout instead of running it (``--sql``)."""
    url = database_url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **configure_options(backend_of(url)),
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on ``connection`` under the migration lock."""
    namespace, timeout = lock_settings()
    held = bool(config.attributes.get(migrations.ATTR_LOCK_HELD))
    # The lock comes first: configure and run_migrations read the version
    # table, and that read must see what a previous lock holder applied.
    guard = (
        contextlib.nullcontext()
        if held
        else migrations.lock(connection, namespace=namespace, name=VERSION_TABLE, timeout=timeout)
    )
    with guard:
        context.configure(
            connection=connection,
            on_version_apply=on_version_apply,
            **configure_options(connection.dialect.name),
        )
        with context.begin_transaction():
            context.run_migrations()


async def run_async_migrations() -> None:
    """Open a NullPool async engine for this run, migrate, and dispose of it."""
    engine = migrations._create_engine(database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Migrate a live database: the caller's connection if it passed one, else a new one."""
    connection = config.attributes.get(migrations.ATTR_CONNECTION)
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
