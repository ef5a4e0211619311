"""Database URLs: which forms writeturn accepts, and how to show one safely.

Every place that prints, logs or raises with a URL goes through :func:`redact`,
so a password never leaves the process in text.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import ssl
from typing import Any, Literal
from urllib.parse import parse_qsl, quote

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
    "mask_password",
    "engine_options",
    "hosts_of",
    "TARGET_SESSION_ATTRS",
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

# Several Postgres hosts, tried in order (failover): libpq's form and SQLAlchemy's.
HOST_LIST_FORMS = (
    "postgresql://user:password@host1:5432,host2:5432/dbname (libpq's form) or "
    "postgresql+asyncpg://user:password@/dbname?host=host1:5432&host=host2:5432 "
    "(SQLAlchemy's), with e.g. target_session_attrs=read-write"
)

SUPPORTED_FORMS = (
    "sqlite+aiosqlite:///path/to/file.db (or sqlite:///...), "
    "postgresql+asyncpg://user:password@host:5432/dbname (or postgresql://...); "
    "several hosts: postgresql://user:password@host1:5432,host2:5432/dbname "
    "(or ...@/dbname?host=host1:5432&host=host2:5432)"
)


# user:password@ anywhere in the text (a scheme may be missing or mistyped).
_USERINFO = re.compile(r"(?P<user>(?:^|(?<=[/\s]))[^\s/:@?#]*):(?P<secret>[^\s@/][^\s@]*|)@")
# password=..., pass=... or pwd=... in a query string or key=value text.
_QUERY_SECRET = re.compile(
    r"(?P<name>\b(?:sslpassword|password|passwd|pass|pwd)=)(?P<secret>[^&\s;]*)", re.I
)


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


def _host_list_error(url: str | URL, problem: str) -> UnsupportedDatabase:
    return UnsupportedDatabase(
        f"the host list (host) of the database URL {_named(url)} {problem}; "
        f"give several hosts as {HOST_LIST_FORMS}"
    )


def _port(url: str | URL, port: str, host: str) -> int:
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise _host_list_error(url, f"gives host {shown(host)} the port {shown(port)}, "
                               "which is not a port number (1 to 65535)")  # fmt: skip
    return int(port)


# scheme://[user[:password]@]hosts[/dbname][?query], userinfo as SQLAlchemy's parser reads it.
_LIBPQ_URL = re.compile(
    r"(?P<scheme>[\w+]+)://(?P<userinfo>[^:/]*(?::[^@]*)?@)?(?P<hosts>[^/?#]*)(?P<rest>.*)",
    re.S,
)
_LIBPQ_HOST = re.compile(
    r"\[(?P<ipv6>[^\]]*)\](?::(?P<port>.*))?|(?P<host>[^:]*)(?::(?P<port2>.*))?"
)


def _from_libpq_host_list(text: str) -> str:
    """libpq's ``user@h1:p1,h2:p2/db`` as SQLAlchemy's ``user@/db?host=h1:p1&host=h2:p2``
    (a host without a port gets libpq's 5432). Anything else comes back as it is."""
    m = _LIBPQ_URL.fullmatch(text)
    if m is None or m["scheme"] not in _DRIVERS or "," not in m["hosts"]:
        return text
    if _DRIVERS[m["scheme"]][0] != "postgresql":
        return text
    path, _, query = m["rest"].partition("?")
    given = {name for name, _ in parse_qsl(query, keep_blank_values=True)}
    if mixed := sorted(given & {"host", "port"}):
        where = " and ".join(f"{name}=" for name in mixed)
        raise _host_list_error(text, f"names hosts both before the database name and in {where}")
    hosts: list[tuple[str, int]] = []
    for entry in m["hosts"].split(","):
        part = _LIBPQ_HOST.fullmatch(entry)
        assert part is not None  # every text matches the second branch at least
        host = part["ipv6"] if part["ipv6"] is not None else part["host"]
        port = part["port"] if part["ipv6"] is not None else part["port2"]
        if host.startswith("[") or (part["ipv6"] is not None and ":" not in host):
            raise _host_list_error(text, f"has the host {shown(entry)}, which is not a host")
        if not host:
            raise _host_list_error(text, f"has an empty host ({shown(entry)})")
        hosts.append((host, 5432 if port is None else _port(text, port, host)))
    if any(":" in host for host, _ in hosts):
        # SQLAlchemy splits host=h:p at its first colon: IPv6 addresses go in host=h1,h2
        # with their ports in port=p1,p2.
        params = "host={}&port={}".format(
            quote(",".join(h for h, _ in hosts), safe=":,"), ",".join(str(p) for _, p in hosts)
        )
    else:
        params = "&".join(f"host={quote(h, safe='')}:{p}" for h, p in hosts)
    return f"{m['scheme']}://{m['userinfo'] or ''}{path}?{params}{'&' + query if query else ''}"


def hosts_of(url: URL) -> list[tuple[str | None, int | None]]:
    """The hosts of a Postgres URL, with their ports, in the order they are tried.

    One entry for a single host (``None`` where the URL names none); several for a
    host list given as ``?host=h1:p1&host=h2:p2`` or ``?host=h1,h2&port=p1,p2``,
    which is checked as SQLAlchemy's asyncpg dialect would read it: a malformed
    list raises :class:`UnsupportedDatabase`.
    """
    host = url.query.get("host")
    port = url.query.get("port")
    if isinstance(host, tuple):  # host=h1:p1&host=h2:p2
        if port is not None:
            raise _host_list_error(url, "gives ports both in host=h:p and in port=; use one form")
        tokens = [token.split(":", 1) if ":" in token else [token, None] for token in host]
    elif isinstance(host, str) and ("," in host or "," in str(port) or isinstance(port, tuple)):
        names = host.split(",")
        ports = port.split(",") if isinstance(port, str) else list(port or ())
        if len(ports) != len(names):
            raise _host_list_error(url, f"has {len(names)} hosts and {len(ports)} ports in "
                                   "host= and port=; give one port per host")  # fmt: skip
        tokens = [[name, p] for name, p in zip(names, ports, strict=True)]
        for name, _ in tokens:
            if name and ":" in name and not _is_ipv6(name):
                raise _host_list_error(url, f"has the host {shown(name)} in host=h1,h2, where "
                                       "ports go in port=p1,p2")  # fmt: skip
    else:  # one host: the URL's, or host=h (host=h:p, or with port=p)
        if not isinstance(host, str):
            return [(url.host, url.port)]
        name, _, number = host.rpartition(":") if port is None else (host, "", str(port))
        if not (name and number.isascii() and number.isdigit()):
            return [(host, None)]
        return [(name, int(number))]
    found: list[tuple[str | None, int | None]] = []
    for name, p in tokens:
        if not name:
            raise _host_list_error(url, "has an empty host")
        if p is None:
            raise _host_list_error(url, f"gives host {shown(name)} no port; with several "
                                   "hosts each needs its port, e.g. host=host1:5432")  # fmt: skip
        found.append((name, _port(url, p, name)))
    return found


def _is_ipv6(name: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address)
    except ValueError:
        return False


def _parse(url: str | URL) -> URL:
    """``url`` as a SQLAlchemy URL, a libpq host list turned into SQLAlchemy's form."""
    return url if isinstance(url, URL) else make_url(_from_libpq_host_list(url))


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and map it onto the async driver writeturn uses.

    ``sqlite://`` becomes ``sqlite+aiosqlite://`` and ``postgresql://``
    becomes ``postgresql+asyncpg://``; any other database or driver raises
    :class:`UnsupportedDatabase` naming the supported forms. Several Postgres
    hosts in libpq's form (``user@h1:5432,h2:5432/db``, a host without a port on
    5432) become SQLAlchemy's (``user@/db?host=h1:5432&host=h2:5432``), which is
    taken as it is; a malformed host list is refused here, not at the first connect.
    """
    if not isinstance(url, URL | str):
        raise UnsupportedDatabase(
            f"database URL must be a string or sqlalchemy URL, not {type(url).__name__}; "
            f"use one of: {SUPPORTED_FORMS}"
        )
    try:
        parsed = _parse(url)
    except UnsupportedDatabase:
        raise
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
    if backend == "postgresql":
        hosts_of(parsed)  # a malformed host list is refused here, not at the first connect
    return parsed.set(drivername=drivername)


def describe_error(exc: BaseException, url: str | URL | None = None) -> str:
    """``exc`` on one line: its type and the first line of its message, with the
    password of ``url`` (if given and parseable) masked.

    Only the first line: a driver's later lines may quote a connection string.
    The one such text of the library, the command line and the tools.
    """
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].rstrip()}" if lines else type(exc).__name__
    return mask_password(text, url)


def mask_password(text: str, url: str | URL | None) -> str:
    """``text`` with the password of ``url`` (parseable or not) shown as ``***``."""
    password = None
    if url:
        with contextlib.suppress(Exception):  # an unparseable URL has no password to mask
            password = _parse(url).password
    if not password and isinstance(url, str) and (found := _USERINFO.search(url)):
        password = found["secret"]  # a malformed URL's password, as typed
    if isinstance(password, str) and password:
        text = text.replace(password, "***")
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


# What a Postgres URL's query may hold, besides the libpq parameters in _LIBPQ_UNMAPPED
# (refused with their own message). Mapped here onto asyncpg's arguments:
_MAPPED = (
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslnegotiation", "connect_timeout",
    "application_name", "dbname",
)  # fmt: skip
# Passed on as they are: SQLAlchemy reads host (several hosts: ?host=h1:5432&host=h2:5432),
# port and prepared_statement_cache_size; asyncpg takes the others, as strings, by name.
_PASSED_ON = (
    "host", "port", "user", "password", "target_session_attrs", "ssl", "command_timeout",
    "prepared_statement_cache_size",
)  # fmt: skip
_SSL_NEGOTIATIONS = ("postgres", "direct")
#: What asyncpg (``asyncpg.connect_utils.SessionAttribute``) and libpq take as
#: ``target_session_attrs``: which of several hosts to stay connected to.
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")


def _where(url: URL) -> str:
    """The URL without its query but its hosts, for a message about one query parameter:
    another parameter's value may be a secret that redact() does not know by name."""
    return redact(url.set(query={k: v for k, v in url.query.items() if k in ("host", "port")}))


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
    ``ssl``, ``sslnegotiation=direct`` its ``direct_tls`` (``postgres`` is the
    default), ``connect_timeout`` its ``timeout`` (zero or less: no limit, as in
    libpq), ``dbname`` the database, and ``application_name`` a server setting;
    connections are named ``writeturn`` in ``pg_stat_activity`` unless the URL or
    ``connect_args={"server_settings": {"application_name": ...}}`` names them.
    ``host``, ``port``, ``user``, ``password``, ``target_session_attrs``, ``ssl``,
    ``command_timeout`` and ``prepared_statement_cache_size`` pass on as they are.
    Any other parameter (other libpq ones, ``requirepeer``, unknown names) raises
    :class:`UnsupportedDatabase` naming it. Returns the URL without the mapped
    parameters and the engine options to use; SQLite URLs come back unchanged.
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
        if name == "requirepeer":
            # A security check: connecting without it would be silently weaker than asked.
            raise UnsupportedDatabase(
                f"the database URL {_where(url)!r} has requirepeer, which asks the client to "
                "check the operating-system user of the server process on a Unix-domain "
                "socket; asyncpg cannot make that check, and writeturn does not connect "
                "without it. Drop requirepeer only where the socket's directory is protected "
                "otherwise (its permissions), or connect over TCP with sslmode=verify-full"
            )
        if name not in _MAPPED and name not in _PASSED_ON:
            raise UnsupportedDatabase(
                f"the database URL {_where(url)!r} has the query parameter {shown(name)}, "
                "which neither libpq nor asyncpg takes in a URL (a mistyped name?); "
                f"accepted: {', '.join(_MAPPED + _PASSED_ON)}. Drop it, or pass other "
                "asyncpg arguments through connect_args={...} (see asyncpg.connect)"
            )
    attrs = _one(url, "target_session_attrs")
    if attrs is not None and attrs not in TARGET_SESSION_ATTRS:
        raise UnsupportedDatabase(
            f"target_session_attrs={shown(attrs)} in {_where(url)!r} is not a session "
            f"attribute asyncpg takes; use one of {', '.join(TARGET_SESSION_ATTRS)} (e.g. "
            "read-write: connect to the first host that accepts writes)"
        )
    dbname = _one(url, "dbname")
    if dbname:
        if url.database and url.database != dbname:
            raise UnsupportedDatabase(
                f"the database URL {_where(url)!r} names the database twice: "
                f"{shown(url.database)} in its path and dbname={shown(dbname)}; keep one"
            )
        url = url.set(database=dbname)  # as libpq takes it
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
    negotiation = _one(url, "sslnegotiation")
    if negotiation is not None and negotiation not in _SSL_NEGOTIATIONS:
        raise UnsupportedDatabase(
            f"sslnegotiation={shown(negotiation)} in {_where(url)!r} is not an SSL negotiation; "
            "use postgres (the default: ask the server first) or direct (TLS at once, with "
            "sslmode=require or stronger)"
        )
    if negotiation == "direct":
        # As libpq: a weaker sslmode could fall back to plaintext once the server refuses
        # direct TLS. asyncpg (0.28 and later) calls this direct_tls.
        if mode not in ("require", "verify-ca", "verify-full"):
            given = f"sslmode={shown(mode)}" if mode is not None else "no sslmode"
            raise UnsupportedDatabase(
                f"sslnegotiation=direct in {_where(url)!r} comes with {given}; direct TLS "
                "needs sslmode=require, verify-ca or verify-full (as in libpq): add e.g. "
                "sslmode=require, or drop sslnegotiation=direct"
            )
        connect["direct_tls"] = True
    timeout = _one(url, "connect_timeout")
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise UnsupportedDatabase(
                f"connect_timeout={timeout!r} in {_where(url)!r} is not a finite number of "
                "seconds; give one, e.g. connect_timeout=10, or connect_timeout=0 for no limit"
            )
        # libpq: zero or less waits without a limit. asyncpg's timeout=0 would fail every
        # connect at once, and leaving it out would mean asyncpg's 60 seconds.
        connect["timeout"] = seconds if seconds > 0 else None
    app_name = _one(url, "application_name")
    user_args = dict(options.get("connect_args") or {})
    settings = {"application_name": app_name or APPLICATION_NAME}
    settings.update(user_args.pop("server_settings", None) or {})
    connect["server_settings"] = settings
    connect.update(user_args)  # what the caller passed explicitly wins
    stripped = url.difference_update_query(_MAPPED)
    return stripped, {**options, "connect_args": connect}
