"""Database URLs: which forms writeturn accepts, and how to show one safely.

Every place that prints, logs or raises with a URL goes through :func:`redact`,
so a password never leaves the process in text.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import UnsupportedDatabase

__all__ = ["Backend", "normalize_url", "redact", "backend_of"]

Backend = Literal["sqlite", "postgresql"]

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


def redact(url: str | URL) -> str:
    """Return ``url`` as text with any password replaced by ``***``.

    Text that is not a parseable URL is returned with everything between
    ``://`` and ``@`` masked, so even a malformed URL cannot leak a secret.
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        text = str(url)
        scheme, sep, rest = text.partition("://")
        if sep and "@" in rest:
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return text


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
            f"cannot parse database URL {redact(url)!r}; use one of: {SUPPORTED_FORMS}"
        ) from None
    entry = _DRIVERS.get(parsed.drivername)
    if entry is None:
        raise UnsupportedDatabase(
            f"unsupported database URL {redact(parsed)!r} (driver {parsed.drivername!r}); "
            f"writeturn supports: {SUPPORTED_FORMS}"
        )
    backend, drivername = entry
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UnsupportedDatabase(
            f"SQLite URL {redact(parsed)!r} names no file; writeturn needs a database file that "
            "every connection shares, e.g. sqlite+aiosqlite:///./app.db"
        )
    return parsed.set(drivername=drivername)


def backend_of(url: URL) -> Backend:
    """Return which database family an (already normalized) URL points at."""
    entry = _DRIVERS.get(url.drivername)
    if entry is None:
        raise UnsupportedDatabase(
            f"unsupported database URL {redact(url)!r}; writeturn supports: {SUPPORTED_FORMS}"
        )
    return entry[0]
