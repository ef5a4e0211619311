"""The ``writeturn`` command as users run it, in real child processes: the version, usage
errors that never echo a password, and one clean error line (never a traceback) for a bad
URL or an unreachable database, from every command."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import writeturn

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2"
UNREACHABLE = f"postgresql://app:{SECRET}@127.0.0.1:1/app"  # nothing listens on port 1
UNSUPPORTED = f"mysql://app:{SECRET}@db/app"


def writeturn_cmd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "WRITETURN_DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "writeturn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, "PYTHONWARNINGS": "error", **(env or {})},
    )


def assert_one_clean_line(done: subprocess.CompletedProcess[str], prefix: str) -> str:
    output = done.stdout + done.stderr
    assert SECRET not in output, output
    assert "Traceback" not in output, output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def test_version_comes_from_the_package_metadata() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert writeturn.__version__ == declared
    done = writeturn_cmd("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"writeturn {declared}"


def test_help_lists_every_command() -> None:
    done = writeturn_cmd("--help")
    assert done.returncode == 0
    for command in ("demo", "migrate", "doctor", "bench"):
        assert command in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["migrate", "--url", UNREACHABLE],  # --url belongs after the action
        ["demo", "--urls", UNREACHABLE],  # a typo
        ["demo", f"--urls={UNREACHABLE}"],
        ["doctor", "--url", UNREACHABLE, "extra", UNREACHABLE],
        ["bench", "--writers", UNREACHABLE],
        ["migrate", "sideways", "--url", UNREACHABLE],
        [UNREACHABLE],
    ],
)
def test_usage_errors_never_echo_a_password(args: list[str]) -> None:
    done = writeturn_cmd(*args)
    assert done.returncode == 2, done.stderr
    assert SECRET not in done.stdout + done.stderr, done.stderr
    assert "error:" in done.stderr
    assert ":***@" in done.stderr or "invalid choice" in done.stderr, done.stderr


def test_migrate_history_accepts_url_like_its_siblings() -> None:
    done = writeturn_cmd("migrate", "history", "--url", UNREACHABLE)
    assert done.returncode == 0, done.stderr
    assert "(head)" in done.stdout
    assert SECRET not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (["demo", "--url", UNSUPPORTED], "writeturn demo: error: unsupported database URL"),
        (["doctor", "--url", UNSUPPORTED], "writeturn doctor: error: unsupported database URL"),
        (
            ["migrate", "current", "--url", UNSUPPORTED],
            "writeturn migrate current: error: unsupported database URL",
        ),
        (["bench", "--url", UNSUPPORTED], "writeturn bench: error: unsupported database URL"),
    ],
)
def test_an_unsupported_url_is_one_line_and_exit_2(args: list[str], prefix: str) -> None:
    done = writeturn_cmd(*args)
    assert done.returncode == 2, done.stderr
    assert_one_clean_line(done, prefix)


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (["demo", "--url", UNREACHABLE, "--writes", "1"], "writeturn demo: error: cannot reach"),
        (["migrate", "upgrade", "--url", UNREACHABLE], "writeturn migrate upgrade: error:"),
        (["bench", "--url", UNREACHABLE, "--writes", "1"], "writeturn bench: error: cannot reach"),
    ],
)
def test_an_unreachable_database_is_one_line_and_exit_1(args: list[str], prefix: str) -> None:
    done = writeturn_cmd(*args)
    assert done.returncode == 1, done.stdout + done.stderr
    line = assert_one_clean_line(done, prefix)
    assert "app:***@127.0.0.1:1/app" in line
    assert done.stdout == ""


def test_the_url_from_the_environment_is_masked_too() -> None:
    done = writeturn_cmd("migrate", "current", env={"WRITETURN_DATABASE_URL": UNREACHABLE})
    assert done.returncode == 1
    assert_one_clean_line(done, "writeturn migrate current: error:")


def test_doctor_reports_an_unreachable_database_without_a_traceback() -> None:
    done = writeturn_cmd("doctor", "--url", UNREACHABLE)
    assert done.returncode == 1
    assert "FAIL  connection: database unreachable" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_bench_refuses_a_plot_without_matplotlib_before_running(tmp_path: Path) -> None:
    # A matplotlib that cannot be imported, as on a machine without the 'bench' extra.
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n"
    )
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    done = writeturn_cmd(
        "bench", "--writes", "100000", "--plot", str(tmp_path / "b.png"), env={"PYTHONPATH": path}
    )
    assert done.returncode == 2
    line = assert_one_clean_line(done, "writeturn bench: error: --plot needs matplotlib")
    assert "pip install 'writeturn[bench]'" in line
    assert done.stdout == ""  # not a single cell ran


def test_bench_refuses_an_output_folder_that_does_not_exist(tmp_path: Path) -> None:
    done = writeturn_cmd("bench", "--json", str(tmp_path / "missing" / "out.json"))
    assert done.returncode == 2
    assert_one_clean_line(done, "writeturn bench: error: --json")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--cancel-rate", "1"], "cancel rate must be a number from 0 up to (not incl"),
        (["demo", "--cancel-rate", "1.5"], "cancel rate must be a number from 0 to 1, got '1.5'"),
        (["bench", "--writers", "1,0"], "writers must be a whole number of at least 1, got '0'"),
        (["doctor", "--idle-threshold", "-1"], "idle threshold must be a number of seconds 0 or"),
        (["migrate", "upgrade", "--lock-timeout", "0"], "lock timeout must be a number of seco"),
        (["bench", "--strategies", "turn,fast"], "strategies: 'fast'; choose from raw, bulk"),
    ],
)
def test_bad_values_name_the_value_and_the_range(args: list[str], message: str) -> None:
    done = writeturn_cmd(*args)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr


def test_the_console_script_runs() -> None:
    script = Path(sys.executable).with_name("writeturn")
    if not script.exists():
        pytest.fail(f"the console script is not installed next to {sys.executable}")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"writeturn {writeturn.__version__}"
