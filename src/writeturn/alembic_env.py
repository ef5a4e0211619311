"""Filters for your Alembic env.py, so your migrations leave writeturn's tables alone.

writeturn's migrations create their own tables (``writeturn_journal``) and their own
version table (``writeturn_alembic_version``) in your database. Your metadata does not
list them, so without a filter ``alembic revision --autogenerate`` writes a migration
that drops them and ``alembic check`` reports drift. Pass the filters to
``context.configure`` in both the online and the offline function of your env.py::

    from writeturn.alembic_env import include_name, include_object

    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=include_name,
        include_object=include_object,
    )

With filters of your own, chain them: ``**writeturn_filters(include_name=mine)``.
(The module is not named ``writeturn.alembic`` so that it never shadows Alembic.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .schema import VERSION_TABLE, metadata

__all__ = ["WRITETURN_TABLES", "include_name", "include_object", "writeturn_filters"]

#: Every table writeturn's migrations create, its version table included.
WRITETURN_TABLES: frozenset[str] = frozenset({*metadata.tables, VERSION_TABLE})

IncludeName = Callable[[str | None, str, Mapping[str, Any]], bool]
IncludeObject = Callable[[Any, str | None, str, bool, Any], bool]


def _ours(table: str | None) -> bool:
    return table is not None and table.rpartition(".")[2] in WRITETURN_TABLES


def include_name(name: str | None, type_: str, parent_names: Mapping[str, Any]) -> bool:
    """Alembic's ``include_name`` hook: skip writeturn's tables as they are reflected."""
    if type_ == "table":
        return not _ours(name)
    return not _ours(parent_names.get("table_name"))


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's ``include_object`` hook: skip writeturn's tables and what belongs to them."""
    if type_ == "table":
        return not _ours(name)
    table = getattr(obj, "table", None)
    return not _ours(getattr(table, "name", None))


# The module's hooks under names that writeturn_filters' parameters do not hide.
_skip_name = include_name
_skip_object = include_object


def writeturn_filters(
    include_name: IncludeName | None = None, include_object: IncludeObject | None = None
) -> dict[str, Any]:
    """``include_name`` and ``include_object`` for ``context.configure(**...)`` that skip
    writeturn's tables, then ask your own filters (if given) about everything else."""
    mine_name, mine_object = include_name, include_object

    def name_filter(name: str | None, type_: str, parent_names: Mapping[str, Any]) -> bool:
        if not _skip_name(name, type_, parent_names):
            return False
        return mine_name is None or mine_name(name, type_, parent_names)

    def object_filter(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        if not _skip_object(obj, name, type_, reflected, other):
            return False
        return mine_object is None or mine_object(obj, name, type_, reflected, other)

    return {"include_name": name_filter, "include_object": object_filter}
