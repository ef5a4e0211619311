"""The lock-id derivation is part of the compatibility contract, and NUL cannot forge an id."""

from __future__ import annotations

from pathlib import Path

import pytest

from writeturn import ConfigurationError, WriteSerializer, migrations
from writeturn._options import check_key
from writeturn.dialects import lock_id, migration_lock_id

# Computed once from lock_id as it was released, and written down here on purpose.
PINNED = [
    ("writeturn", "", 904102071024494274),
    ("writeturn", "account:42", -2222642077551112870),
    ("tenant", "x", -6499658780776819767),
    ("myservice", "order:7", 7079275047097495360),
    ("writeturn", "ключ:é", 2713091965259268074),
    ("ns", "k" * 500, -6307555362987843264),
]


@pytest.mark.parametrize(("namespace", "key", "expected"), PINNED)
def test_lock_ids_never_change(namespace: str, key: str, expected: int) -> None:
    """The one test whose expected values are hard-coded, and that is its point.

    During a rolling deploy old and new processes write side by side. If a
    release derived a different id for the same (namespace, key), the two
    would take different advisory locks and write the same key at once. A
    change that makes this test fail breaks mutual exclusion across versions:
    never update these numbers; keep the derivation instead.
    """
    assert lock_id(namespace, key) == expected


# The migration lock's ids, likewise: migrators of two releases must wait for each other.
PINNED_MIGRATION = [
    ("writeturn", "writeturn_alembic_version", -9049902245685913173),
    ("writeturn", "alembic_version", -2815452841851996982),
    ("myapp", "alembic_version", 2159332349466422425),
]


@pytest.mark.parametrize(("namespace", "name", "expected"), PINNED_MIGRATION)
def test_migration_lock_ids_never_change(namespace: str, name: str, expected: int) -> None:
    """Hard-coded on purpose, as above: never update these numbers."""
    assert migration_lock_id(namespace, name) == expected
    assert migrations.lock_key(namespace, name) == expected
    assert expected != lock_id(namespace, name)


def test_a_nul_would_let_two_names_share_a_lock_so_it_is_refused(tmp_path: Path) -> None:
    # The derivation joins namespace and key with a NUL: these two collide.
    assert lock_id("tenant", "x\x00y") == lock_id("tenant\x00x", "y")
    with pytest.raises(ConfigurationError, match="NUL"):
        check_key("x\x00y")
    with pytest.raises(ConfigurationError, match="NUL"):
        WriteSerializer.from_url(f"sqlite:///{tmp_path / 'app.db'}", namespace="tenant\x00x")
