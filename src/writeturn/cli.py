"""The ``writeturn`` command: ``demo``, ``migrate`` and the other subcommands.

Each subcommand lives in the module of its concept and registers itself here
through a ``register_cli(subparsers)`` function that sets ``func`` (returning
the exit code) on its parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    from . import bench, demo
    from .doctor import register_cli as register_doctor
    from .migrations import register_cli as register_migrate

    parser = argparse.ArgumentParser(
        prog="writeturn",
        description="Fair, ordered, cancellation-safe database writes for asyncio services.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo.register_cli(sub)
    register_migrate(sub)
    register_doctor(sub)
    bench.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
