"""Database URLs: accepted forms, rejected forms, and that a password never shows."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL, make_url

from writeturn.errors import ConfigurationError, UnsupportedDatabase, WriteturnError
from writeturn.urls import backend_of, describe_error, normalize_url, redact

SECRET = "s3cret"


# -- accepted forms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "drivername", "database"),
    [
        ("sqlite:///app.db", "sqlite+aiosqlite", "app.db"),
        ("sqlite:////abs/path/app.db", "sqlite+aiosqlite", "/abs/path/app.db"),
        ("sqlite+aiosqlite:///app.db", "sqlite+aiosqlite", "app.db"),
        ("postgresql://u:s3cret@db.example:5432/prod", "postgresql+asyncpg", "prod"),
        ("postgres://u:s3cret@db.example:5432/prod", "postgresql+asyncpg", "prod"),
        ("postgresql+asyncpg://u:s3cret@db.example:5432/prod", "postgresql+asyncpg", "prod"),
    ],
)
def test_normalize_maps_onto_the_async_driver(given: str, drivername: str, database: str) -> None:
    url = normalize_url(given)
    assert isinstance(url, URL)
    assert url.drivername == drivername
    assert url.database == database
    # Nothing else about the URL changes.
    original = make_url(given)
    assert (url.username, url.password, url.host, url.port) == (
        original.username,
        original.password,
        original.host,
        original.port,
    )


def test_normalize_keeps_credentials_host_port_and_query() -> None:
    url = normalize_url("postgresql://u:s3cret@h:6543/db?ssl=require")
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "u",
        SECRET,
        "h",
        6543,
        "db",
    )
    assert dict(url.query) == {"ssl": "require"}


def test_normalize_accepts_a_url_object() -> None:
    url = normalize_url(make_url("sqlite:///x.db"))
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == "x.db"


def test_normalize_is_idempotent() -> None:
    for given in ("sqlite:///a.db", "postgres://u:p@h/db"):
        once = normalize_url(given)
        assert normalize_url(once) == once


# -- rejected forms ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        "mysql://u:s3cret@h/db",
        "mysql+aiomysql://u:s3cret@h/db",
        "postgresql+psycopg2://u:s3cret@h/db",
        "postgresql+psycopg://u:s3cret@h/db",
        "sqlite+pysqlite:///app.db",
        "oracle://u:s3cret@h/db",
    ],
)
def test_unsupported_driver_is_rejected_naming_the_supported_forms(given: str) -> None:
    with pytest.raises(UnsupportedDatabase) as info:
        normalize_url(given)
    err = info.value
    assert isinstance(err, ConfigurationError)
    assert isinstance(err, ValueError)
    assert isinstance(err, WriteturnError)
    msg = str(err)
    assert "sqlite+aiosqlite:///" in msg
    assert "postgresql+asyncpg://" in msg
    assert repr(make_url(given).drivername) in msg  # names what was wrong
    assert SECRET not in msg


@pytest.mark.parametrize(
    "given",
    ["sqlite://", "sqlite:///:memory:", "sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"],
)
def test_sqlite_without_a_file_is_rejected(given: str) -> None:
    with pytest.raises(UnsupportedDatabase) as info:
        normalize_url(given)
    assert isinstance(info.value, ConfigurationError)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "sqlite+aiosqlite:///" in msg  # says what to use instead
    assert "file" in msg


@pytest.mark.parametrize("given", [None, 42, b"sqlite:///a.db"])
def test_non_string_is_rejected(given: object) -> None:
    with pytest.raises(UnsupportedDatabase) as info:
        normalize_url(given)  # type: ignore[arg-type]
    assert "postgresql+asyncpg://" in str(info.value)


def test_catching_value_error_catches_it() -> None:
    with pytest.raises(ValueError):
        normalize_url("mysql://h/db")


# -- the password never shows -------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        "postgresql://u:s3cret@h/db",
        "postgres://u:s3cret@h:5432/db",
        "postgresql+asyncpg://u:s3cret@h/db",
        "mysql://u:s3cret@h/db",
        "postgresql+psycopg2://u:s3cret@h/db",
        "postgresql://u:s3cret@h:notaport/db",  # does not parse
        "postgresql://u:s3cret@[::1/db",  # does not parse
    ],
)
def test_redact_hides_the_password(given: str) -> None:
    out = redact(given)
    assert SECRET not in out
    assert "***" in out
    assert "@h" in out or "@[" in out  # the host part is still shown


def test_redact_of_a_url_object() -> None:
    url = make_url("postgresql+asyncpg://u:s3cret@h:5432/db")
    out = redact(url)
    assert SECRET not in out
    assert out == "postgresql+asyncpg://u:***@h:5432/db"


def test_redact_leaves_urls_without_password_unchanged() -> None:
    assert redact("sqlite+aiosqlite:///app.db") == "sqlite+aiosqlite:///app.db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_redact_of_non_url_text_returns_it_unchanged() -> None:
    assert redact("not a url at all") == "not a url at all"
    assert redact("") == ""


@pytest.mark.parametrize(
    "given",
    [
        "postgresql://u:s3cret@h/db",
        "mysql://u:s3cret@h/db",
        "postgresql+psycopg2://u:s3cret@h/db",
        "postgresql://u:s3cret@h:notaport/db",
        "postgresql://u:s3cret@[::1/db",
        "sqlite://u:s3cret@/",
    ],
)
def test_error_messages_never_contain_the_password(given: str) -> None:
    try:
        normalize_url(given)
    except UnsupportedDatabase as err:
        assert SECRET not in str(err)
        assert SECRET not in repr(err)
        # Not hidden in the chain either (tracebacks print it).
        assert err.__cause__ is None
        assert err.__suppress_context__ or err.__context__ is None
    else:
        assert given == "postgresql://u:s3cret@h/db"  # the only valid one


def test_unparseable_url_error_names_the_supported_forms() -> None:
    with pytest.raises(UnsupportedDatabase) as info:
        normalize_url("postgresql://u:s3cret@h:notaport/db")
    msg = str(info.value)
    assert SECRET not in msg
    assert "postgresql+asyncpg://" in msg and "sqlite+aiosqlite:///" in msg


# BUG (library, src/writeturn/urls.py, redact(), the fallback for text make_url cannot
# parse): it only masks between "://" and "@". A malformed URL whose scheme separator is
# mistyped ("postgresql:/..." or "postgresql//...") or missing ("u:s3cret@h/db") is
# returned verbatim, password included - and normalize_url() puts that text into its
# UnsupportedDatabase message ("cannot parse database URL ..."). The module docstring
# promises "even a malformed URL cannot leak a secret".
@pytest.mark.parametrize(
    "given",
    ["postgresql:/u:s3cret@h/db", "postgresql//u:s3cret@h/db", "u:s3cret@h/db"],
)
def test_malformed_url_with_credentials_does_not_leak(given: str) -> None:
    assert SECRET not in redact(given)
    with pytest.raises(UnsupportedDatabase) as info:
        normalize_url(given)
    assert SECRET not in str(info.value)


# BUG (library, src/writeturn/urls.py, redact()): render_as_string(hide_password=True)
# masks only the userinfo password; a password given as a query parameter (accepted by
# libpq and passed through to asyncpg.connect by SQLAlchemy) is shown in full by
# redact() and in normalize_url()'s error messages.
def test_password_in_query_string_is_hidden() -> None:
    assert SECRET not in redact("postgresql://u@h/db?password=s3cret")
    with pytest.raises(UnsupportedDatabase) as info:
        normalize_url("mysql://u@h/db?password=s3cret")
    assert SECRET not in str(info.value)


# -- backend_of -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "backend"),
    [
        ("sqlite:///a.db", "sqlite"),
        ("sqlite+aiosqlite:///a.db", "sqlite"),
        ("postgresql://u:p@h/db", "postgresql"),
        ("postgres://u:p@h/db", "postgresql"),
        ("postgresql+asyncpg://u:p@h/db", "postgresql"),
    ],
)
def test_backend_of(given: str, backend: str) -> None:
    assert backend_of(normalize_url(given)) == backend
    assert backend_of(make_url(given)) == backend


def test_backend_of_unsupported_raises_without_the_password() -> None:
    with pytest.raises(UnsupportedDatabase) as info:
        backend_of(make_url("mysql://u:s3cret@h/db"))
    assert SECRET not in str(info.value)
    assert "postgresql+asyncpg://" in str(info.value)


# -- libpq-style parameters of Postgres URLs -----------------------------------------------


def _options(url: str, **options: object) -> tuple[URL, dict[str, object]]:
    from writeturn.urls import engine_options

    return engine_options(normalize_url(url), dict(options))


def test_postgres_connections_are_named_writeturn_unless_told_otherwise() -> None:
    url, options = _options("postgresql://u:s3cret@db/app")
    assert options["connect_args"] == {"server_settings": {"application_name": "writeturn"}}
    url, options = _options("postgresql://u@db/app?application_name=billing")
    assert options["connect_args"] == {"server_settings": {"application_name": "billing"}}
    assert "application_name" not in url.query
    _, options = _options(
        "postgresql://u@db/app",
        connect_args={"server_settings": {"application_name": "api", "jit": "off"}},
    )
    assert options["connect_args"] == {"server_settings": {"application_name": "api", "jit": "off"}}


@pytest.mark.parametrize(
    "mode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
)
def test_sslmode_becomes_asyncpgs_ssl_argument(mode: str) -> None:
    url, options = _options(f"postgresql://u:s3cret@db/app?sslmode={mode}&connect_timeout=7")
    connect = options["connect_args"]
    assert isinstance(connect, dict)
    assert connect["ssl"] == mode and connect["timeout"] == 7.0
    assert dict(url.query) == {}


def test_sqlite_urls_are_left_alone() -> None:
    url, options = _options("sqlite:///app.db", echo=True)
    assert options == {"echo": True} and url == normalize_url("sqlite:///app.db")


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("sslmode=sometimes", ["sslmode='sometimes'", "verify-full"]),
        ("sslpassword=x", ["sslpassword", "connect_args"]),
        ("options=-c%20jit%3Doff", ["options", "connect_args"]),
        ("connect_timeout=soon", ["connect_timeout='soon'", "connect_timeout=10"]),
        ("sslmode=disable&sslrootcert=/ca.pem", ["sslrootcert", "sslmode=disable"]),
        ("sslmode=verify-full&sslrootcert=/no/such/ca.pem", ["sslrootcert", "/no/such/ca.pem"]),
        # Parameters asyncpg cannot honour, and names neither libpq nor asyncpg takes:
        ("sslnegotiation=direct", ["sslnegotiation=direct", "sslmode=require"]),
        ("sslnegotiation=direct&sslmode=prefer", ["sslmode='prefer'", "sslmode=require"]),
        ("sslnegotiation=sometimes", ["sslnegotiation='sometimes'", "direct"]),
        ("requirepeer=postgres", ["requirepeer", "asyncpg cannot"]),
        ("foo=bar", ["'foo'", "sslmode", "connect_args"]),
        (f"token={SECRET}", ["'token'"]),
        (f"sslpassword={SECRET}", ["sslpassword"]),
    ],
)
def test_libpq_parameters_asyncpg_lacks_are_named_with_the_fix(
    query: str, names: list[str]
) -> None:
    with pytest.raises(UnsupportedDatabase) as caught:
        _options(f"postgresql://u:{SECRET}@db/app?{query}")
    message = str(caught.value)
    for name in names:
        assert name in message, message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("given", "timeout"), [("0", None), ("-1", None), ("-0.5", None), ("2.5", 2.5)]
)
def test_a_connect_timeout_of_zero_or_less_means_no_limit_as_in_libpq(
    given: str, timeout: float | None
) -> None:
    url, options = _options(f"postgresql://u:{SECRET}@db/app?connect_timeout={given}")
    connect = options["connect_args"]
    assert isinstance(connect, dict)
    assert "timeout" in connect and connect["timeout"] == timeout
    assert "connect_timeout" not in url.query


@pytest.mark.parametrize("given", ["nan", "NaN", "inf", "-inf", "1e999", "soon"])
def test_a_connect_timeout_that_is_not_a_finite_number_is_refused(given: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        _options(f"postgresql://u:{SECRET}@db/app?connect_timeout={given}")
    message = str(caught.value)
    assert f"connect_timeout={given!r}" in message and "connect_timeout=0" in message, message
    assert SECRET not in message


@pytest.mark.parametrize(
    "given",
    [
        f"postgresql://u:{SECRET}@db?dbname=app",
        f"postgresql://u:{SECRET}@db/?dbname=app",
        f"postgresql://u:{SECRET}@db/app?dbname=app",
    ],
)
def test_dbname_names_the_database_as_in_libpq(given: str) -> None:
    url, _ = _options(given)
    assert url.database == "app" and "dbname" not in url.query
    assert url.password == SECRET


def test_a_dbname_that_contradicts_the_path_is_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        _options(f"postgresql://u:{SECRET}@db/app?dbname=other")
    message = str(caught.value)
    assert "'app'" in message and "dbname='other'" in message, message
    assert SECRET not in message


def test_sslnegotiation_postgres_is_the_default_and_direct_is_direct_tls() -> None:
    url, options = _options("postgresql://u@db/app?sslnegotiation=postgres")
    connect = options["connect_args"]
    assert isinstance(connect, dict) and "direct_tls" not in connect
    assert "sslnegotiation" not in url.query
    for mode in ("require", "verify-ca", "verify-full"):
        url, options = _options(f"postgresql://u@db/app?sslnegotiation=direct&sslmode={mode}")
        connect = options["connect_args"]
        assert isinstance(connect, dict)
        assert connect["direct_tls"] is True and connect["ssl"] == mode
        assert dict(url.query) == {}


@pytest.mark.parametrize(
    "query",
    [
        "target_session_attrs=read-write",
        "prepared_statement_cache_size=0",
        "command_timeout=30",
        "host=h1:5432&host=h2:5432",
    ],
)
def test_parameters_sqlalchemy_and_asyncpg_take_from_a_url_pass(query: str) -> None:
    url, _ = _options(f"postgresql://u@/app?{query}")
    assert set(url.query) == {query.split("=")[0]}


@pytest.mark.parametrize(
    ("exc", "url", "expected"),
    [
        (OSError("refused\nat postgresql://app:pw_s3cret@db/app"), None, "OSError: refused"),
        (
            OSError("\n  bad pw_s3cret  \nmore"),
            "postgresql://app:pw_s3cret@db/app",
            "OSError: bad ***",
        ),
        (
            RuntimeError("pw_s3cret"),
            make_url("postgresql://app:pw_s3cret@db/app"),
            "RuntimeError: ***",
        ),
        (TimeoutError(), None, "TimeoutError"),
        (ValueError("  "), "not a url", "ValueError"),
        (ValueError("x"), "postgresql://app@db/app", "ValueError: x"),
    ],
)
def test_an_error_is_told_in_one_line_with_the_password_masked(
    exc: BaseException, url: str | URL | None, expected: str
) -> None:
    assert describe_error(exc, url) == expected


# -- several Postgres hosts in one URL (failover) ---------------------------------------


@pytest.mark.parametrize(
    ("given", "hosts"),
    [
        (
            f"postgresql://app:{SECRET}@db1:5432,db2:5433/app?target_session_attrs=read-write",
            ("db1:5432", "db2:5433"),
        ),
        (f"postgresql+asyncpg://app:{SECRET}@db1,db2:6432/app", ("db1:5432", "db2:6432")),
        (f"postgres://app:{SECRET}@10.0.0.1:5432,10.0.0.2:5432,db3/app", None),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1:5432&host=db2:5432", None),
    ],
)
def test_several_hosts_become_sqlalchemys_host_list(given: str, hosts: tuple[str, ...]) -> None:
    url = normalize_url(given)
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.database) == ("app", SECRET, "app")
    assert url.host is None and url.port is None
    if hosts is not None:
        assert url.query["host"] == hosts
    assert isinstance(url.query["host"], tuple) and len(url.query["host"]) >= 2
    # The dialect reads that list as asyncpg's host and port lists.
    from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

    _, opts = PGDialect_asyncpg().create_connect_args(url)
    assert len(opts["host"]) == len(opts["port"]) == len(url.query["host"])
    assert all(isinstance(port, int) for port in opts["port"])


def test_the_other_parameters_of_a_multi_host_url_stay() -> None:
    url = normalize_url(
        f"postgresql://app:{SECRET}@db1:5432,db2:5432/app?target_session_attrs=read-write"
        "&sslmode=require"
    )
    assert dict(url.query) == {
        "host": ("db1:5432", "db2:5432"),
        "target_session_attrs": "read-write",
        "sslmode": "require",
    }
    url, _ = _options(
        f"postgresql://app:{SECRET}@db1:5432,db2:5432/app?target_session_attrs=read-only"
    )
    assert dict(url.query) == {
        "host": ("db1:5432", "db2:5432"),
        "target_session_attrs": "read-only",
    }


def test_ipv6_hosts_in_brackets() -> None:
    url = normalize_url(f"postgresql://app:{SECRET}@[::1]:5433,127.0.0.1/app")
    from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

    _, opts = PGDialect_asyncpg().create_connect_args(url)
    assert opts["host"] == ["::1", "127.0.0.1"] and opts["port"] == [5433, 5432]
    assert url.password == SECRET and url.database == "app"


@pytest.mark.parametrize(
    "given",
    [
        "postgresql://app:s3cret@db.example:5432/prod",
        "postgresql://app:s3cret@db.example/prod",
        "postgresql://app:s3cret@[::1]:5433/prod",
        "postgresql+asyncpg://app@/prod?host=/var/run/postgresql",
        "postgresql+asyncpg://app@/prod?host=db1&port=5432",
    ],
)
def test_a_single_host_is_parsed_as_before(given: str) -> None:
    assert normalize_url(given) == make_url(given).set(drivername="postgresql+asyncpg")


@pytest.mark.parametrize(
    ("given", "names"),
    [
        (f"postgresql://app:{SECRET}@db1:5432,,db2/app", ["empty host"]),
        (f"postgresql://app:{SECRET}@db1:5432,/app", ["empty host"]),
        (f"postgresql://app:{SECRET}@db1:5432,:5433/app", ["empty host"]),
        (f"postgresql://app:{SECRET}@db1:abc,db2/app", ["'abc'", "port"]),
        (f"postgresql://app:{SECRET}@db1:5432,db2:70000/app", ["'70000'", "port"]),
        (f"postgresql://app:{SECRET}@db1:0,db2/app", ["'0'", "port"]),
        (f"postgresql://app:{SECRET}@db1:5432,db2:5432/app?host=db3:5432", ["both"]),
        (f"postgresql://app:{SECRET}@db1:5432,db2:5432/app?port=5432", ["both"]),
        (f"postgresql://app:{SECRET}@[::1:5432,db2/app", ["'[::1:5432'"]),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1:5432&host=:5433", ["empty"]),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1:5432&host=db2:x", ["'x'", "port"]),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1:5432&host=db2:0", ["'0'", "port"]),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1:5432&host=db2", ["db2", "port"]),
        (
            f"postgresql+asyncpg://app:{SECRET}@/app?host=db1:5432&host=db2:5432&port=5432",
            ["port", "both"],
        ),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1,db2&port=5432", ["2 hosts", "1 port"]),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1,db2&port=5432,x", ["'x'", "port"]),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1,,db2&port=1,2,3", ["empty"]),
        (f"postgresql+asyncpg://app:{SECRET}@/app?host=db1,db2", ["port"]),
    ],
)
def test_a_malformed_host_list_is_refused_at_once(given: str, names: list[str]) -> None:
    with pytest.raises(UnsupportedDatabase) as caught:
        normalize_url(given)
    err = caught.value
    message = str(err)
    assert "host" in message
    for name in names:
        assert name in message, message
    # The accepted forms, both of them.
    assert "host1:5432,host2:5432" in message and "?host=host1:5432&host=host2:5432" in message
    assert SECRET not in message and SECRET not in repr(err), message
    assert err.__cause__ is None
    assert err.__suppress_context__ or err.__context__ is None


@pytest.mark.parametrize(
    "value", ["any", "primary", "standby", "prefer-standby", "read-write", "read-only"]
)
def test_target_session_attrs_asyncpg_takes_pass(value: str) -> None:
    url, _ = _options(f"postgresql://app:{SECRET}@db1,db2/app?target_session_attrs={value}")
    assert url.query["target_session_attrs"] == value


def test_the_accepted_target_session_attrs_are_asyncpgs() -> None:
    from asyncpg.connect_utils import SessionAttribute  # type: ignore[import-untyped]

    from writeturn.urls import TARGET_SESSION_ATTRS

    assert set(TARGET_SESSION_ATTRS) == {attr.value for attr in SessionAttribute}


@pytest.mark.parametrize("value", ["master", "readwrite", "READ-WRITE", "read_write"])
def test_an_unknown_target_session_attrs_is_refused_at_once(value: str) -> None:
    given = f"postgresql://app:{SECRET}@db1:5432,db2:5432/app?target_session_attrs={value}"
    with pytest.raises(UnsupportedDatabase) as caught:
        _options(given)
    message = str(caught.value)
    assert f"target_session_attrs={value!r}" in message, message
    assert "read-write" in message and "prefer-standby" in message
    assert "db1" in message  # which URL, hosts included
    assert SECRET not in message


@pytest.mark.parametrize(
    "given",
    [
        f"postgresql://app:{SECRET}@db1:5432,db2:5432/app",
        f"postgresql+asyncpg://app:{SECRET}@db1,db2/app?target_session_attrs=read-write",
        f"postgresql://app:{SECRET}@db1:5432,,db2/app",
        f"postgresql://app:{SECRET}@[::1]:5433,db2/app",
    ],
)
def test_redact_masks_the_password_of_a_multi_host_url(given: str) -> None:
    out = redact(given)
    assert SECRET not in out and "app:***@" in out, out
    assert "db2" in out  # the hosts still show


def test_redact_of_a_normalized_multi_host_url() -> None:
    url = normalize_url(f"postgresql://app:{SECRET}@db1:5432,db2:5432/app")
    out = redact(url)
    assert SECRET not in out and "app:***@" in out and "db1" in out and "db2" in out, out


def test_a_multi_host_error_is_told_with_the_password_masked() -> None:
    given = f"postgresql://app:{SECRET}@db1:5432,db2:5432/app"
    assert describe_error(OSError(f"bad {SECRET}"), given) == "OSError: bad ***"
    assert describe_error(OSError(f"bad {SECRET}"), normalize_url(given)) == "OSError: bad ***"
    malformed = f"postgresql://app:{SECRET}@db1:5432,,db2/app"
    assert describe_error(OSError(f"bad {SECRET}"), malformed) == "OSError: bad ***"


def test_a_message_about_a_parameter_names_the_hosts() -> None:
    with pytest.raises(UnsupportedDatabase) as caught:
        _options(f"postgresql://app:{SECRET}@db1:5432,db2:5432/app?sslnegotiation=sometimes")
    message = str(caught.value)
    assert "db1" in message and "db2" in message, message
    assert SECRET not in message


def test_the_supported_forms_name_several_hosts() -> None:
    with pytest.raises(UnsupportedDatabase) as caught:
        normalize_url(f"mysql://app:{SECRET}@db/app")
    assert "host1:5432,host2:5432" in str(caught.value)
