"""The tables writeturn owns, as SQLAlchemy Core metadata.

:data:`metadata` is exactly what the library's migrations create, so
``alembic check`` against a migrated database reports no drift; change one only
together with a new migration. User tables never belong here: the library's
migrations create and drop only the library's own tables.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
    func,
)

__all__ = ["VERSION_TABLE", "metadata", "journal"]

#: Alembic's version table for the library's migrations. It is not Alembic's
#: default ``alembic_version``, so it never collides with an application's own.
VERSION_TABLE = "writeturn_alembic_version"

#: Deterministic constraint names, identical on SQLite and Postgres, so that a
#: later migration can name a constraint to alter or drop it.
NAMING_CONVENTION = {
    "pk": "pk_%(table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: One row per committed write: ``seq`` numbers the writes of one
#: ``(namespace, key)`` from 1 without gaps, because it is computed as
#: ``max(seq) + 1`` while the key's write lock is held. A non-NULL
#: ``idempotency_key`` is unique per namespace; NULLs may repeat (standard SQL
#: behaviour on both SQLite and Postgres).
journal = Table(
    "writeturn_journal",
    metadata,
    Column("namespace", String(200), nullable=False),
    Column("key", String(500), nullable=False),
    Column("seq", BigInteger(), nullable=False, autoincrement=False),
    Column("idempotency_key", String(500), nullable=True),
    Column("writer", String(200), nullable=True),
    Column(
        "committed_at",
        DateTime(timezone=True),
        nullable=False,
        server_default=func.now(),
    ),
    PrimaryKeyConstraint("namespace", "key", "seq", name="pk_writeturn_journal"),
    UniqueConstraint("namespace", "idempotency_key", name="uq_writeturn_journal_idempotency"),
)
