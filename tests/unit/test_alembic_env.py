"""The env.py filters: writeturn's tables out, everything else up to the user's filters."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Index, Integer, MetaData, Table

from writeturn.alembic_env import WRITETURN_TABLES, include_name, include_object, writeturn_filters
from writeturn.schema import journal


def test_writeturns_tables_and_their_parts_are_skipped() -> None:
    assert WRITETURN_TABLES == {"writeturn_journal", "writeturn_alembic_version"}
    assert not include_name("writeturn_journal", "table", {})
    assert not include_name("writeturn_alembic_version", "table", {"schema_name": None})
    assert not include_name("ix_x", "index", {"table_name": "writeturn_journal"})
    assert include_name("accounts", "table", {})
    assert include_name("ix_x", "index", {"table_name": "accounts"})
    assert not include_object(journal, "writeturn_journal", "table", False, None)
    assert not include_object(journal.c.seq, "seq", "column", True, None)
    accounts = Table("accounts", MetaData(), Column("id", Integer), Index("ix_id", "id"))
    assert include_object(accounts, "accounts", "table", False, None)
    assert include_object(accounts.c.id, "id", "column", False, None)


def test_the_users_own_filters_decide_the_rest() -> None:
    asked: list[Any] = []

    def mine(name: str | None, type_: str, parent_names: Any) -> bool:
        asked.append(name)
        return name != "legacy"

    filters = writeturn_filters(include_name=mine)
    assert filters["include_name"]("accounts", "table", {})
    assert not filters["include_name"]("legacy", "table", {})
    assert not filters["include_name"]("writeturn_journal", "table", {})
    assert asked == ["accounts", "legacy"]  # writeturn's table never reached the user's filter
    assert filters["include_object"](None, "accounts", "table", False, None)
