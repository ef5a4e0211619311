"""What mypy says about calls to submit() and run(): the function's positional
arguments and result are checked, a function that takes no session is refused, and a
write with an idempotency key may give None (a duplicate's function did not run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SNIPPET = """
from sqlalchemy.ext.asyncio import AsyncSession
from writeturn import WriteSerializer

async def deposit(session: AsyncSession, account: int, amount: int = 1) -> int:
    return account + amount

async def no_session(account: int) -> int:
    return account

async def main(ser: WriteSerializer) -> None:
    ok: int = await ser.run(deposit, 42, 10, key="account:42")   # fine
    handle = ser.submit(deposit, 42, key="k", timeout=2.0)
    total: int = await handle                                     # fine
    await ser.run(deposit, "42", key="k")                         # E: wrong argument type
    await ser.run(no_session, 42)                                 # E: takes no session
    bad: str = await ser.run(deposit, 42)                         # E: wrong result type
    maybe: int = await ser.run(deposit, 1, idempotency_key="i")   # E: None for a duplicate
    known: int | None = await ser.run(deposit, 1, idempotency_key="i")   # fine
"""


def test_mypy_checks_write_functions_and_their_arguments(tmp_path: Path) -> None:
    snippet = tmp_path / "service.py"
    snippet.write_text(SNIPPET)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(snippet),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = SNIPPET.splitlines()
    expected = {n for n, line in enumerate(lines, 1) if "# E:" in line}
    errors = {int(m.group(1)) for m in re.finditer(r"service\.py:(\d+): error:", result.stdout)}
    assert errors == expected, result.stdout + result.stderr
    assert result.returncode == 1
