"""The write journal: a row per journaled write, committed in the write's own transaction.

A journaled write (``WriteSerializer(journal=True)``, or any write with an
``idempotency_key``) inserts its row before the write function runs, under
the key's lock, in one statement that assigns the next per-key sequence number
and claims the idempotency key. So the row commits if and only if the write
commits, ``seq`` is gap-free per key across processes, and a second write with
the same idempotency key finds the first one's row instead of running again.

The table is created by the library's migrations (``writeturn migrate upgrade``).
The statements below are plain SQL that SQLite (3.35+) and Postgres both accept.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import String, TextClause, bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from ._error_kinds import ErrorKind, classify
from .errors import IdempotencyKeyReused, JournalMissing, shown

__all__ = ["JournalEntry", "record", "lookup", "probe", "missing_table", "check_table"]

TABLE = "writeturn_journal"


def _typed(sql: str) -> TextClause:
    # Typed parameters: asyncpg cannot infer one used twice in different roles.
    names = [n for n in ("ns", "key", "ik", "writer", "probe_key") if f":{n}" in sql]
    return text(sql).bindparams(*(bindparam(n, type_=String()) for n in names))


# The WHERE clause is what lets SQLite tell this ON CONFLICT from a join's ON.
_RECORD = _typed(
    f"INSERT INTO {TABLE} (namespace, key, seq, idempotency_key, writer) "
    f"SELECT :ns, :key, COALESCE(MAX(seq), 0) + 1, :ik, :writer FROM {TABLE} "
    "WHERE namespace = :ns AND key = :key "
    "ON CONFLICT (namespace, idempotency_key) DO NOTHING RETURNING seq"
)
_LOOKUP = _typed(f"SELECT seq, key FROM {TABLE} WHERE namespace = :ns AND idempotency_key = :ik")
# A probe claims the idempotency key in a transaction that is always rolled
# back. Postgres makes it wait until any transaction holding the key has
# ended, so the answer is final, not a snapshot of a COMMIT still in flight.
_PROBE = _typed(
    f"INSERT INTO {TABLE} (namespace, key, seq, idempotency_key) "
    "VALUES (:ns, :probe_key, -1, :ik) "
    "ON CONFLICT (namespace, idempotency_key) DO NOTHING RETURNING seq"
)
_CHECK = text(f"SELECT 1 FROM {TABLE} WHERE 1 = 0")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """What the journal says of a write: its ``seq``, and whether an earlier
    write with the same idempotency key already committed (``duplicate``)."""

    seq: int
    duplicate: bool


async def record(
    conn: AsyncConnection, namespace: str, key: str, idempotency_key: str | None, writer: str | None
) -> JournalEntry:
    """Insert this write's journal row inside its transaction (the key's lock is held).

    Raises :class:`IdempotencyKeyReused` if the idempotency key belongs to a
    committed write on another key.
    """
    params = {"ns": namespace, "key": key, "ik": idempotency_key, "writer": writer}
    try:
        seq = (await conn.execute(_RECORD, params)).scalar()
    except DBAPIError as exc:
        if missing_table(conn, exc):
            raise _missing() from exc
        raise
    if seq is not None:
        return JournalEntry(seq=int(seq), duplicate=False)
    row = (await conn.execute(_LOOKUP, {"ns": namespace, "ik": idempotency_key})).one()
    if row[1] != key:
        # Idempotency keys are per namespace, not per key: the same one on
        # another key is a caller's bug, and reporting it as a duplicate
        # would hand out the other key's seq for a write that never ran.
        raise IdempotencyKeyReused(
            f"idempotency_key {shown(idempotency_key)} was already used by a committed write "
            f"on key {shown(row[1])}, and this write is on key {shown(key)}; an idempotency "
            "key names one write in its namespace, so this write did not run and was rolled "
            "back. Give each write its own idempotency key, e.g. "
            "idempotency_key=f'{key}:{request_id}'"
        )
    return JournalEntry(seq=int(row[0]), duplicate=True)


async def lookup(conn: AsyncConnection, namespace: str, idempotency_key: str) -> int | None:
    """The committed ``seq`` of the write with ``idempotency_key``, or None."""
    try:
        row = (await conn.execute(_LOOKUP, {"ns": namespace, "ik": idempotency_key})).first()
    except DBAPIError as exc:
        if missing_table(conn, exc):
            raise _missing() from exc
        raise
    return None if row is None else int(row[0])


async def probe(conn: AsyncConnection, namespace: str, idempotency_key: str, seq: int) -> bool:
    """Whether the write that inserted ``idempotency_key``'s row with ``seq`` committed,
    waiting out one still in flight.

    The row's ``seq`` tells that write's row from another write's with the same
    idempotency key (one committed after this write rolled back). Runs in the
    caller's transaction, which the caller must roll back.
    """
    params = {"ns": namespace, "probe_key": "writeturn:probe", "ik": idempotency_key}
    if (await conn.execute(_PROBE, params)).scalar() is not None:
        return False  # the key was free: no write with it committed
    row = (await conn.execute(_LOOKUP, {"ns": namespace, "ik": idempotency_key})).first()
    return row is not None and int(row[0]) == seq


async def check_table(conn: AsyncConnection) -> None:
    """Raise :class:`JournalMissing` if the journal table does not exist."""
    try:
        await conn.execute(_CHECK)
    except DBAPIError as exc:
        if missing_table(conn, exc):
            raise _missing() from exc
        raise


def missing_table(conn: AsyncConnection, exc: DBAPIError) -> bool:
    """True if ``exc``, raised by a statement on ``conn`` that names only the journal
    table, says that table does not exist."""
    return ErrorKind.MISSING_TABLE in classify(conn.dialect.name, exc)


def _missing() -> JournalMissing:
    return JournalMissing(
        f"the write journal table {TABLE} does not exist in this database; create it with "
        "`writeturn migrate upgrade --url <database url>` (or writeturn.migrations.upgrade(url))"
    )
