"""The ``writeturn`` command: ``demo``, ``doctor``, ``migrate`` and ``bench``.

One module per command (``cli/demo.py`` ...), each with ``register(subparsers)``
that adds its parser and sets ``run`` (returning the exit status) on it. What
they share (argument types, the ``--url`` / ``$WRITETURN_DATABASE_URL`` lookup,
the one-line error with passwords masked) is in ``cli/_common.py``. The
commands only parse and print; the work is done by the tools
(``writeturn.tools.demo``, ``writeturn.tools.doctor``, ``writeturn.tools.bench``)
and ``writeturn.migrations``, which know nothing of argparse.

Exit status: 0 success, 1 a failed check or run (an unreachable database
included), 2 invalid usage or configuration, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .. import __version__
from . import bench, demo, doctor, migrate
from ._common import URL_ENV, Parser, print_error

__all__ = ["main", "build_parser"]


def build_parser() -> Parser:
    """The argument parser with every command registered."""
    parser = Parser(
        prog="writeturn",
        description="Fair, ordered, cancellation-safe database writes for asyncio services.",
        epilog=f"every command reads the database URL from --url or ${URL_ENV}",
    )
    parser.add_argument("--version", action="version", version=f"writeturn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (demo, migrate, doctor, bench):
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    name: str = getattr(args, "error_prefix", args.command)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a traceback: it could quote the URL
        return print_error(name, exc, [*args_list, os.environ.get(URL_ENV)])
    return code
