"""Database URLs: which forms writeturn accepts, and how to show one safely.

Every place that prints, logs or raises with a URL goes through :func:`redact`,
so a password never leaves the process in text.
"""

from __future__ import annotations

import re
from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import UnsupportedDatabase, shown

__all__ = ["URL_ENV", "Backend", "normalize_url", "redact", "backend_of", "describe_error"]

Backend = Literal["sqlite", "postgresql"]

#: The environment variable naming the database when a command gets no ``--url``.
URL_ENV = "WRITETURN_DATABASE_URL"

_DRIVERS: dict[str, tuple[Backend, str]] = {
    "sqlite": ("sqlite", "sqlite+aiosqlite"),
    "sqlite+aiosqlite": ("sqlite", "sqlite+aiosqlite"),
    "postgresql": ("postgresql", "postgresql+asyncpg"),
    "postgres": ("postgresql", "postgresql+asyncpg"),
    "postgresql+asyncpg": ("postgresql", "postgresql+asyncpg"),
}

SUPPORTED_FORMS = (
    "sqlite+aiosqlite:///path/to/file.db (or sqlite:///...), "
    "postgresql+asyncpg://user:password@host:5432/dbname (or postgresql://...)"
)


# user:password@ anywhere in the text (a scheme may be missing or mistyped).
_USERINFO = re.compile(r"(?P<user>(?:^|(?<=[/\s]))[^\s/:@?#]*):(?P<secret>[^\s@/][^\s@]*|)@")
# password=..., pass=... or pwd=... in a query string or key=value text.
_QUERY_SECRET = re.compile(r"(?P<name>\b(?:password|passwd|pass|pwd)=)(?P<secret>[^&\s;]*)", re.I)


def redact(url: str | URL) -> str:
    """Return ``url`` as text with any password replaced by ``***``.

    Covers the password of ``user:password@host``, a ``password=`` query
    parameter, and text that is not a parseable URL at all, so even a
    malformed URL cannot leak a secret.
    """
    if isinstance(url, URL):
        text = url.render_as_string(hide_password=True)
    else:
        try:
            text = make_url(url).render_as_string(hide_password=True)
        except (ArgumentError, ValueError, TypeError):
            text = str(url)
    text = _USERINFO.sub(lambda m: f"{m['user']}:***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['name']}***", text)


def _named(url: str | URL) -> str:
    """A URL for an error message: password masked, cut if very long (later than other
    values, since the database name comes last)."""
    return shown(redact(url), 200)


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and map it onto the async driver writeturn uses.

    ``sqlite://`` becomes ``sqlite+aiosqlite://`` and ``postgresql://``
    becomes ``postgresql+asyncpg://``; any other database or driver raises
    :class:`UnsupportedDatabase` naming the supported forms.
    """
    if not isinstance(url, URL | str):
        raise UnsupportedDatabase(
            f"database URL must be a string or sqlalchemy URL, not {type(url).__name__}; "
            f"use one of: {SUPPORTED_FORMS}"
        )
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        # `from None`: the parser's own message may quote the URL, password included.
        raise UnsupportedDatabase(
            f"cannot parse database URL {_named(url)}; use one of: {SUPPORTED_FORMS}"
        ) from None
    entry = _DRIVERS.get(parsed.drivername)
    if entry is None:
        raise UnsupportedDatabase(
            f"unsupported database URL {_named(parsed)} "
            f"(driver {shown(parsed.drivername)}); "
            f"writeturn supports: {SUPPORTED_FORMS}"
        )
    backend, drivername = entry
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UnsupportedDatabase(
            f"SQLite URL {_named(parsed)} names no file; writeturn needs a database file "
            "that every connection shares, e.g. sqlite+aiosqlite:///./app.db"
        )
    return parsed.set(drivername=drivername)


def describe_error(exc: BaseException, url: URL) -> str:
    """A one-line description of ``exc`` with the URL's password masked."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if url.password:
        text = text.replace(str(url.password), "***")
    return text


def backend_of(url: URL) -> Backend:
    """Return which database family an (already normalized) URL points at."""
    entry = _DRIVERS.get(url.drivername)
    if entry is None:
        raise UnsupportedDatabase(
            f"unsupported database URL {_named(url)}; writeturn supports: {SUPPORTED_FORMS}"
        )
    return entry[0]
