"""A real PgBouncer in transaction pooling mode, started for one test as its own process.

It listens on a free loopback port and forwards every database name to the test
Postgres server, with a small server pool (``POOL``) so that tests can fill it.
PgBouncer refuses to run as root: started by root, it runs as the ``postgres`` user.
Where no pgbouncer binary is installed the tests skip and say how to install one,
unless ``WRITETURN_REQUIRE_PGBOUNCER=1`` (CI), where they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

POOL = 4  # server connections per (database, user)
QUERY_WAIT_TIMEOUT = 20  # seconds a client may wait for a server connection

CONFIG = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/userlist.txt
pool_mode = transaction
default_pool_size = {pool}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 500
query_wait_timeout = {query_wait}
server_lifetime = 3600
ignore_startup_parameters = extra_float_digits,application_name,options
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
"""


def _binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_pgbouncer(postgres_url: str) -> Iterator[str]:
    """Start PgBouncer in front of ``postgres_url``'s server; yield the same URL through it."""
    exe = _binary()
    if exe is None:
        msg = (
            "pgbouncer is not installed; install it (Debian: apt-get install pgbouncer) to run "
            "the tests behind a real PgBouncer"
        )
        if os.environ.get("WRITETURN_REQUIRE_PGBOUNCER") == "1":
            pytest.fail(msg + " [WRITETURN_REQUIRE_PGBOUNCER=1]")
        pytest.skip(msg)
    url = make_url(postgres_url)
    workdir = Path(tempfile.mkdtemp(prefix="writeturn-pgbouncer-"))
    workdir.chmod(0o777)  # PgBouncer runs as postgres and writes its log here
    listen = _free_port()
    (workdir / "userlist.txt").write_text(f'"{url.username or "postgres"}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        CONFIG.format(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            listen=listen,
            dir=workdir,
            pool=POOL,
            query_wait=QUERY_WAIT_TIMEOUT,
        )
    )
    as_postgres = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    # Its stderr goes to a file: a pipe nobody reads once it listens fills up under a
    # long run of backend kills, and then PgBouncer blocks, with every client on it.
    stderr = (workdir / "stderr.txt").open("wb")
    proc = subprocess.Popen(
        [exe, str(workdir / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        **as_postgres,  # type: ignore[arg-type]
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                err = (workdir / "stderr.txt").read_text(errors="replace")
                log = (
                    (workdir / "pgbouncer.log").read_text()
                    if (workdir / "pgbouncer.log").exists()
                    else ""
                )
                pytest.fail(f"pgbouncer exited with {proc.returncode}: {err}{log}")
            try:
                with socket.create_connection(("127.0.0.1", listen), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("pgbouncer did not listen within 15 s")
                time.sleep(0.05)
        yield url.set(host="127.0.0.1", port=listen).render_as_string(hide_password=False)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)
