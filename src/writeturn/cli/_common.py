"""What every ``writeturn`` command shares: argument types, the URL lookup, the error line.

* Argument types (:func:`whole`, :func:`seconds`, :func:`rate`, :func:`comma_list`,
  :func:`choice_list`) refuse bad input with a message that names the value
  and the allowed range; the bounds are each command's own.
* :func:`database_url` takes ``--url`` or, failing that, ``$WRITETURN_DATABASE_URL``.
* :func:`print_error` prints one line, ``writeturn COMMAND: error: ...``, with
  every password masked, and returns the exit status: 2 for a usage or
  configuration error, 1 for anything else (an unreachable database, a failed run).
* :class:`Parser` is an ``ArgumentParser`` whose own usage errors mask passwords
  too: argparse quotes arguments back (``unrecognized arguments: --urls
  postgresql://app:secret@db/app``), and a URL's password must never be printed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn, TextIO, TypeVar

from sqlalchemy.engine import make_url

from .._options import is_seconds
from ..errors import ConfigurationError, WriteturnError
from ..urls import URL_ENV, describe_error, normalize_url, redact

__all__ = [
    "URL_ENV",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "Parser",
    "whole",
    "seconds",
    "rate",
    "comma_list",
    "choice_list",
    "database_url",
    "add_url_option",
    "print_error",
    "mask",
    "ProgressLine",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

T = TypeVar("T")


# -- masking ---------------------------------------------------------------------------


# scheme://user:PASSWORD@host..., up to the last @ (SQLAlchemy's parser allows / in it).
_TYPED_PASSWORD = re.compile(r"[\w+.-]+://[^:/@\s]*:(\S*)@[^@\s]*$")


def _passwords(texts: Iterable[str]) -> set[str]:
    """The passwords of every parseable URL among ``texts`` (``--url=...`` included)."""
    found: set[str] = set()
    for text in texts:
        candidate = text.split("=", 1)[1] if text.startswith("-") and "=" in text else text
        if "://" not in candidate:
            continue
        with contextlib.suppress(Exception):  # not a URL: redact() covers user:pw@ forms
            found.add(str(make_url(candidate).password or ""))  # decoded: p@ss
        typed = _TYPED_PASSWORD.match(candidate)  # as typed: p%40ss
        if typed:
            found.add(typed.group(1))
    found.discard("")
    return found


def mask(text: str, urls: Iterable[str | None] = (), *, patterns: bool = True) -> str:
    """``text`` with the password of each of ``urls`` (and of the command line's URLs)
    shown as ``***``; with ``patterns``, also anything that looks like ``user:pw@`` or
    ``password=`` (writeturn's own messages are masked when made, and quote the
    ``user:password@host`` form on purpose)."""
    secrets = _passwords([*(u for u in urls if u), *sys.argv[1:]])
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return redact(text) if patterns and text else text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors never show a password.

    Subcommand parsers inherit the class (argparse creates them with the
    parent's type), so one override covers every command.
    """

    argv: Sequence[str] = ()

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {mask(message, self.argv)}\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)


# -- argument types --------------------------------------------------------------------


def _named(name: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    parse.__name__ = name  # argparse names the type in some messages
    return parse


def whole(name: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
    """A whole number from ``lo`` to ``hi`` (no upper bound if None)."""
    allowed = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"

    def parse(value: str) -> int:
        try:
            number: int | None = int(value)
        except ValueError:
            number = None
        if number is None or number < lo or (hi is not None and number > hi):
            raise argparse.ArgumentTypeError(
                f"{name} must be a whole number {allowed}, got {value!r}"
            )
        return number

    return _named(name, parse)


def seconds(name: str, *, allow_zero: bool) -> Callable[[str], float]:
    """A finite number of seconds, above 0 (or from 0 with ``allow_zero``)."""
    allowed = "0 or more" if allow_zero else "above 0"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not is_seconds(number, allow_zero=allow_zero):
            raise argparse.ArgumentTypeError(
                f"{name} must be a number of seconds {allowed}, got {value!r}"
            )
        return number

    return _named(name, parse)


def rate(name: str, *, include_one: bool) -> Callable[[str], float]:
    """A share from 0 to 1; 1 itself only with ``include_one``."""
    allowed = "from 0 to 1" if include_one else "from 0 up to (not including) 1"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        ok = math.isfinite(number) and 0 <= number and (number < 1 or (include_one and number == 1))
        if not ok:
            raise argparse.ArgumentTypeError(f"{name} must be a number {allowed}, got {value!r}")
        return number

    return _named(name, parse)


def comma_list(item: Callable[[str], T]) -> Callable[[str], list[T]]:
    """A comma-separated list of ``item`` values (at least one)."""

    def parse(value: str) -> list[T]:
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma list, got {value!r}")
        return [item(part) for part in parts]

    return _named(getattr(item, "__name__", "list"), parse)


def choice_list(
    name: str, allowed: Sequence[str], norm: Callable[[str], str] = str.strip
) -> Callable[[str], list[str]]:
    """A comma-separated list of names from ``allowed``."""

    def parse(value: str) -> list[str]:
        values = [norm(v.strip()) for v in value.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"{name}: {', '.join(map(repr, bad)) or 'nothing given'}; "
                f"choose from {', '.join(allowed)}"
            )
        return values

    return _named(name, parse)


# -- the database URL ------------------------------------------------------------------


def add_url_option(parser: argparse.ArgumentParser, default_text: str | None = None) -> None:
    """``--url URL``; without it, ``$WRITETURN_DATABASE_URL`` (or ``default_text``'s default)."""
    fallback = f"${URL_ENV}" + (f", else {default_text}" if default_text else "")
    parser.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help=f"database URL (default: {fallback}); a password in it is never printed",
    )


def database_url(given: str | None, *, required: bool = True) -> str | None:
    """``--url``'s value, else ``$WRITETURN_DATABASE_URL``, checked; None if neither
    is set and not ``required``. Raises :class:`ConfigurationError` (password masked)."""
    raw = given or os.environ.get(URL_ENV) or None
    if raw is None:
        if not required:
            return None
        raise ConfigurationError(
            f"no database URL: pass --url URL or set {URL_ENV} "
            "(e.g. sqlite:///./app.db or postgresql://user@host/db)"
        )
    normalize_url(raw)  # raises UnsupportedDatabase, password masked
    return raw


# -- the one error line ----------------------------------------------------------------


def print_error(command: str, exc: BaseException, urls: Iterable[str | None] = ()) -> int:
    """Print ``exc`` as one line on stderr, passwords masked; return the exit status.

    writeturn's own messages are whole sentences, joined onto one line; any
    other error shows its type and first line only (a driver's later lines may
    quote a connection string). No traceback: it could quote the URL.
    """
    message = str(exc).strip()
    if isinstance(exc, WriteturnError) and message:
        line = " ".join(message.split())
    else:
        line = describe_error(exc)
    ours = isinstance(exc, WriteturnError)
    print(f"writeturn {command}: error: {mask(line, urls, patterns=not ours)}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_FAILED


# -- progress --------------------------------------------------------------------------


def _duration(value: float) -> str:
    value = max(0.0, value)
    if value < 60:
        return f"{value:.0f}s"
    if value < 3600:
        return f"{value // 60:.0f}m{value % 60:02.0f}s"
    return f"{value // 3600:.0f}h{value % 3600 / 60:02.0f}m"


class ProgressLine:
    """One line on a terminal, rewritten in place: ``[done/total] elapsed, about N left``.

    The time left is the time so far spread over the work done so far; it is
    shown once a first step is done. Nothing is written unless ``stream`` is a
    terminal (or ``force``), so logs and pipes stay clean.
    """

    def __init__(
        self,
        stream: TextIO,
        unit: str = "",
        *,
        force: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.unit = unit
        self.enabled = force or stream.isatty()
        self._clock = clock
        self._started = clock()
        self._width = 0

    def text(self, done: int, total: int, what: str = "") -> str:
        """The line for ``done`` of ``total`` steps."""
        elapsed = self._clock() - self._started
        left = ""
        if 0 < done < total:
            left = f", about {_duration(elapsed / done * (total - done))} left"
        unit = f" {self.unit}" if self.unit else ""
        line = f"[{done:>{len(str(total))}}/{total}{unit}] {_duration(elapsed)}{left}"
        return f"{line}  {what}" if what else line

    def update(self, done: int, total: int, what: str = "") -> None:
        if not self.enabled:
            return
        line = self.text(done, total, what)[:100]
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self.stream.flush()

    def finish(self) -> None:
        """End the line, so that what follows starts on a fresh one."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
