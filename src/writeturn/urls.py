"""Database URLs: which forms writeturn accepts, and how to show one safely.

Every place that prints, logs or raises with a URL goes through :func:`redact`,
so a password never leaves the process in text.
"""

from __future__ import annotations

import re
import ssl
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import UnsupportedDatabase, shown

__all__ = [
    "URL_ENV",
    "APPLICATION_NAME",
    "Backend",
    "normalize_url",
    "redact",
    "backend_of",
    "describe_error",
    "engine_options",
]

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


#: What ``pg_stat_activity.application_name`` shows for connections writeturn creates.
APPLICATION_NAME = "writeturn"

_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq connection parameters asyncpg has no counterpart for (or that writeturn does not
# map): given in a URL, asyncpg would fail with "unexpected keyword argument".
_LIBPQ_UNMAPPED = frozenset(
    {
        "sslpassword", "sslcrl", "sslcrldir", "sslsni", "sslcompression", "sslcertmode",
        "ssl_min_protocol_version", "ssl_max_protocol_version", "requiressl", "gssencmode",
        "gsslib", "gssdelegation", "krbsrvname", "channel_binding", "require_auth",
        "passfile", "service", "options", "hostaddr", "client_encoding", "replication",
        "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
        "tcp_user_timeout", "load_balance_hosts", "fallback_application_name",
    }
)  # fmt: skip


def _one(url: URL, name: str) -> str | None:
    value = url.query.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UnsupportedDatabase(
            f"the database URL {redact(url)!r} gives {name} more than once; give it once"
        )
    return value


def _ssl_context(url: URL, mode: str | None, files: dict[str, str]) -> ssl.SSLContext:
    """The SSLContext libpq would build for ``sslmode`` with certificate files."""
    if mode in ("disable", "allow", "prefer"):
        raise UnsupportedDatabase(
            f"the database URL {redact(url)!r} gives {', '.join(sorted(files))} with "
            f"sslmode={mode}; certificate files need sslmode=require, verify-ca or verify-full"
        )
    try:
        context = ssl.create_default_context(cafile=files.get("sslrootcert"))
        if "sslcert" in files:
            context.load_cert_chain(files["sslcert"], files.get("sslkey"))
    except (OSError, ssl.SSLError) as exc:
        given = ", ".join(f"{name}={path}" for name, path in sorted(files.items()))
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UnsupportedDatabase(
            f"cannot load the certificate files {given} of {redact(url)!r} ({reason}); check "
            "that those paths name readable PEM files"
        ) from None
    # As in libpq: verify-full checks the host name; verify-ca, and require with a root
    # certificate, check the chain only.
    context.check_hostname = mode == "verify-full"
    if mode == "require" and "sslrootcert" not in files:
        context.verify_mode = ssl.CERT_NONE
    return context


def engine_options(url: URL, options: dict[str, Any]) -> tuple[URL, dict[str, Any]]:
    """Map libpq-style parameters of a Postgres URL onto asyncpg's connect arguments.

    ``sslmode`` (with ``sslrootcert``, ``sslcert``, ``sslkey``) becomes asyncpg's
    ``ssl``, ``connect_timeout`` its ``timeout``, and ``application_name`` a server
    setting; connections are named ``writeturn`` in ``pg_stat_activity`` unless the
    URL or ``connect_args={"server_settings": {"application_name": ...}}`` names them.
    Other libpq parameters raise :class:`UnsupportedDatabase` naming the parameter.
    Returns the URL without those parameters and the engine options to use; SQLite
    URLs come back unchanged.
    """
    if backend_of(url) != "postgresql" or not isinstance(options.get("connect_args") or {}, dict):
        return url, options  # not Postgres, or connect_args of a wrong type: the engine says so
    for name in sorted(url.query):
        if name in _LIBPQ_UNMAPPED:
            raise UnsupportedDatabase(
                f"the database URL {redact(url)!r} has the libpq parameter {name}, which "
                "asyncpg does not take; drop it from the URL, and pass what asyncpg offers "
                "instead through connect_args={...} (see asyncpg.connect)"
            )
    connect: dict[str, Any] = {}
    mode = _one(url, "sslmode")
    if mode is not None and mode not in _SSLMODES:
        raise UnsupportedDatabase(
            f"sslmode={mode!r} in {redact(url)!r} is not an sslmode; use one of "
            f"{', '.join(_SSLMODES)}"
        )
    files = {n: v for n in ("sslrootcert", "sslcert", "sslkey") if (v := _one(url, n))}
    if files:
        connect["ssl"] = _ssl_context(url, mode, files)
    elif mode is not None:
        connect["ssl"] = mode  # asyncpg takes libpq's mode names as they are
    timeout = _one(url, "connect_timeout")
    if timeout is not None:
        try:
            connect["timeout"] = float(timeout)
        except ValueError:
            raise UnsupportedDatabase(
                f"connect_timeout={timeout!r} in {redact(url)!r} is not a number of seconds, "
                "e.g. connect_timeout=10"
            ) from None
    app_name = _one(url, "application_name")
    user_args = dict(options.get("connect_args") or {})
    settings = {"application_name": app_name or APPLICATION_NAME}
    settings.update(user_args.pop("server_settings", None) or {})
    connect["server_settings"] = settings
    connect.update(user_args)  # what the caller passed explicitly wins
    stripped = url.difference_update_query(
        ["sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name"]
    )
    return stripped, {**options, "connect_args": connect}
