"""A user's own Alembic project next to writeturn's tables (writeturn.alembic_env).

The project is made as a user makes one, ``alembic init -t async``, in a temporary
directory, with one table of its own; the database already holds writeturn's migrated
tables. Without the filters, the user's ``alembic check`` wants to drop them; with them,
``revision --autogenerate`` writes only the user's table, and after ``upgrade head``
``alembic check`` finds nothing to do, while writeturn's tables and revision stay.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from writeturn import migrations

MODELS = """
from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()
accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner", String(100), nullable=False),
)
"""

IMPORT_MODELS = """import sys
sys.path.insert(0, {project!r})
from models import metadata as target_metadata
from writeturn.alembic_env import include_name, include_object
"""


def alembic(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_users_autogenerate_and_check_leave_writeturns_tables_alone(
    db_url: str, tmp_path: Path
) -> None:
    migrations.upgrade(db_url)
    writeturn_revision = migrations.current(db_url)
    assert writeturn_revision is not None
    project = tmp_path / "service"
    project.mkdir()
    done = alembic(project, "init", "-t", "async", "migrations")
    assert done.returncode == 0, done.stderr
    ini = project / "alembic.ini"
    ini.write_text(
        ini.read_text().replace(
            "sqlalchemy.url = driver://user:pass@localhost/dbname",
            f"sqlalchemy.url = {make_url(db_url).render_as_string(hide_password=False)}",
        )
    )
    (project / "models.py").write_text(MODELS)
    env = project / "migrations" / "env.py"
    template = env.read_text()
    assert "target_metadata = None" in template
    env.write_text(
        template.replace("target_metadata = None", IMPORT_MODELS.format(project=str(project)))
    )

    # Without the filters: the user's project wants writeturn's tables gone.
    unfiltered = alembic(project, "check")
    assert unfiltered.returncode != 0
    assert "writeturn_journal" in unfiltered.stdout + unfiltered.stderr

    filtered = env.read_text().replace(
        "target_metadata=target_metadata",
        "target_metadata=target_metadata, include_name=include_name, include_object=include_object",
    )
    assert filtered.count("include_object=include_object") == 2  # online and offline
    env.write_text(filtered)
    done = alembic(project, "revision", "--autogenerate", "-m", "accounts")
    assert done.returncode == 0, done.stderr
    [revision] = (project / "migrations" / "versions").glob("*.py")
    script = revision.read_text()
    assert "create_table" in script and "accounts" in script
    assert "writeturn" not in script, script
    done = alembic(project, "upgrade", "head")
    assert done.returncode == 0, done.stderr
    done = alembic(project, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No new upgrade operations detected" in done.stdout + done.stderr
    # writeturn's own schema and revision are as they were.
    assert migrations.current(db_url) == writeturn_revision
    done = alembic(project, "current")
    assert done.returncode == 0 and revision.stem.split("_")[0] in done.stdout, done.stdout
