"""Real Postgres clusters for failover tests: a primary and a streaming standby of its own.

Each ``Cluster`` is a server run from the machine's Postgres binaries (the newest version
under ``/usr/lib/postgresql``) on a free loopback port, with its data directory and Unix
socket directory in a temporary directory. Started by root (as in CI), every server
command runs as the ``postgres`` OS user and the directories belong to it.

``initdb`` runs once per test session into a template data directory; each new primary
is a copy of it (``cp -a``), so a fresh ``ReplicatedPair`` (primary up, standby made by
``pg_basebackup -R`` with a replication slot, streaming and caught up) takes well under
two seconds. The servers run with ``fsync=off``: they hold nothing worth keeping.

The ``replicated_pair`` fixture (registered in tests/conftest.py) yields
``make(synchronous) -> ReplicatedPair`` and removes every cluster it made after the
test, failed or not. Where the binaries are missing or cannot run, it skips and says
why, unless ``WRITETURN_REQUIRE_STANDBY=1`` (CI), where it fails instead.

Two behaviours of Postgres a failover test must know:

* ``pause_replay()`` pauses replay only: the standby still receives and stores the WAL,
  and a promotion replays all of it first. To lose the writes a primary acknowledges
  (asynchronous replication, failover before they reach the standby), cut the stream
  with ``ReplicatedPair.pause_replication()`` (or ``Cluster.stop_receiving()``).
* A fast shutdown of a primary (``switch_over(fence="stop")``) sends every WAL record
  to the connected standbys before it exits: nothing the standby receives is lost.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres", "psql")
REQUIRE_ENV = "WRITETURN_REQUIRE_STANDBY"
SLOT = "standby_slot"
WAIT = 30.0  # seconds any wait for a server state may take before it fails
SHM = Path("/dev/shm")
SHM_ROOM = 1 << 30  # bytes /dev/shm must have free to hold the clusters

#: Appended to the template's postgresql.conf: a small, fast, replicating server.
#: The port and socket directory come on each server's command line (see Cluster.start),
#: so a standby copied from its primary keeps its own.
SETTINGS = """
# writeturn test cluster
listen_addresses = '127.0.0.1'
max_connections = 100
shared_buffers = 16MB
fsync = off
full_page_writes = off
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
max_wal_size = 1GB
checkpoint_timeout = 30min
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 100ms
autovacuum = off
jit = off
logging_collector = off
log_min_messages = warning
"""


class StandbyUnavailable(Exception):
    """The Postgres server binaries are missing or cannot run here."""


def _is_root() -> bool:
    return os.geteuid() == 0


def bin_dir() -> Path:
    """The newest Postgres version's server binaries, or StandbyUnavailable saying why."""
    versions = sorted(
        (p for p in PG_ROOT.glob("*") if re.fullmatch(r"\d+(\.\d+)?", p.name)),
        key=lambda p: tuple(int(n) for n in p.name.split(".")),
    )
    if not versions:
        raise StandbyUnavailable(
            f"no Postgres server binaries under {PG_ROOT} (Debian: apt-get install postgresql)"
        )
    found = versions[-1] / "bin"
    missing = [b for b in BINARIES if not (found / b).is_file()]
    if missing:
        raise StandbyUnavailable(
            f"{found} lacks {', '.join(missing)} (Debian: apt-get install postgresql "
            "postgresql-client)"
        )
    return found


def temp_root() -> str | None:
    """Where the clusters' directories go: /dev/shm where it is a roomy memory file
    system (copying a data directory there is ten times faster than to a disk), else
    the default temporary directory."""
    try:
        room = os.statvfs(SHM)
    except OSError:
        return None
    if room.f_bavail * room.f_frsize < SHM_ROOM or not os.access(SHM, os.W_OK):
        return None
    return str(SHM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own(path: Path) -> None:
    """Hand ``path`` to the postgres user when we are root (the servers run as it)."""
    if _is_root():
        shutil.chown(path, "postgres", "postgres")


def _run(
    args: list[str], *, cwd: Path | None = None, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a Postgres command, as the postgres user when we are root."""
    as_postgres: dict[str, Any] = (
        {"user": "postgres", "group": "postgres", "extra_groups": []} if _is_root() else {}
    )
    done = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **as_postgres,
    )
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}"
            f"{done.stdout.strip()}"
        )
    return done


def _wait_for(what: str, ready: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)


def make_template(workdir: Path) -> Path:
    """``initdb`` once into ``workdir/template``: what every new primary is a copy of."""
    bindir = bin_dir()
    template = workdir / "template"
    try:
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(template),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
                "--wal-segsize=1",  # 1 MB WAL files: less to copy for each cluster
            ],
            cwd=workdir,
            timeout=120,
        )
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        raise StandbyUnavailable(f"initdb from {bindir} cannot run here: {exc}") from exc
    with (template / "postgresql.conf").open("a") as conf:
        conf.write(SETTINGS)
    # Replication connections over TCP: initdb -A trust writes these, but say it anyway.
    with (template / "pg_hba.conf").open("a") as hba:
        hba.write("host replication all 127.0.0.1/32 trust\n")
    return template


class Cluster:
    """One Postgres server: its data in ``<root>/<name>/data``, its socket beside it.

    ``port`` is a free loopback port, chosen when the cluster is made. The cluster is
    neither made nor started by the constructor: use ``from_template`` (a new primary)
    or ``ReplicatedPair`` (a standby from ``pg_basebackup``), then ``start()``.
    """

    def __init__(self, root: Path, name: str, bindir: Path) -> None:
        self.name = name
        self.bindir = bindir
        self.dir = root / name
        self.dir.mkdir(mode=0o700)
        _own(self.dir)
        self.data = self.dir / "data"
        self.sockets = self.dir / "sockets"
        self.sockets.mkdir(mode=0o700)
        _own(self.sockets)
        self.log = self.dir / "server.log"
        self.port = _free_port()
        self._conninfo: str | None = None  # primary_conninfo while stop_receiving() holds it

    @classmethod
    def from_template(cls, template: Path, root: Path, name: str) -> Cluster:
        """A new cluster whose data directory is a copy of ``template`` (not started)."""
        cluster = cls(root, name, bin_dir())
        subprocess.run(["cp", "-a", str(template), str(cluster.data)], check=True)
        return cluster

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, port={self.port})"

    # -- server control --------------------------------------------------------------

    def _pg_ctl(self, *args: str, timeout: float = 60, check: bool = True) -> None:
        _run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            cwd=self.dir,
            timeout=timeout,
            check=check,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections (a standby: reads)."""
        options = f"-p {self.port} -k {self.sockets} -c cluster_name={self.name}"
        try:
            self._pg_ctl("-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.name}'s log:\n{self.log_tail()}") from exc

    def stop(self, mode: Literal["fast", "immediate", "smart"] = "fast") -> None:
        """Stop the server: ``fast`` (clean, the WAL sent to standbys) or ``immediate``
        (a crash: no shutdown checkpoint, nothing more sent)."""
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def is_running(self) -> bool:
        if not self.data.exists():
            return False
        status = _run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
            cwd=self.dir,
            check=False,
        )
        return status.returncode == 0

    def cleanup(self) -> None:
        """Stop the server immediately if it runs and remove all its files; never raises."""
        try:
            if self.data.exists():
                self._pg_ctl("-m", "immediate", "-w", "-t", "30", "stop", check=False)
        except Exception:
            pass
        try:
            pid_file = self.data / "postmaster.pid"
            if pid_file.exists():  # pg_ctl could not stop it: kill the postmaster
                os.kill(int(pid_file.read_text().split()[0]), 9)
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- SQL -------------------------------------------------------------------------

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        """A SQLAlchemy URL for this server alone (user postgres, no password)."""
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, query: str, database: str = "postgres") -> str:
        """Run ``query`` with ``psql -At`` and return its output, stripped (rows by
        newlines, columns by ``|``). An error raises RuntimeError with psql's message."""
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                query,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5", "PGPASSWORD": ""},
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: {query!r} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def _try_sql(self, query: str) -> str | None:
        try:
            return self.sql(query)
        except RuntimeError:
            return None

    def in_recovery(self) -> bool:
        return self.sql("SELECT pg_is_in_recovery()") == "t"

    def timeline(self) -> int:
        """The server's timeline: the current WAL file's on a primary, the last
        checkpoint's on a standby."""
        if self.in_recovery():
            return int(self.sql("SELECT timeline_id FROM pg_control_checkpoint()"))
        return int(self.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[:8], 16)

    # -- standby control -------------------------------------------------------------

    def promote(self) -> None:
        """Promote this standby and wait until it is out of recovery (takes writes).

        Promotion replays all the WAL the standby has received, paused replay or not;
        paused replay is resumed first, as the server would, but without its 1 s wait."""
        if self.sql("SELECT pg_get_wal_replay_pause_state()") != "not paused":
            self.resume_replay()
        self._pg_ctl("-w", "-t", "60", "promote")
        _wait_for(
            f"{self.name} promoted", lambda: self._try_sql("SELECT pg_is_in_recovery()") == "f"
        )

    def pause_replay(self) -> None:
        """Pause WAL replay on this standby and wait until it is paused. It keeps
        receiving WAL (see ``stop_receiving``), and a promotion replays what it has."""
        self.sql("SELECT pg_wal_replay_pause()")
        _wait_for(
            f"{self.name} replay paused",
            lambda: self.sql("SELECT pg_get_wal_replay_pause_state()") == "paused",
        )

    def resume_replay(self) -> None:
        self.sql("SELECT pg_wal_replay_resume()")
        _wait_for(
            f"{self.name} replay resumed",
            lambda: self.sql("SELECT pg_get_wal_replay_pause_state()") == "not paused",
        )

    def receiving(self) -> bool:
        """Whether this standby's WAL receiver streams from its primary."""
        return (
            self.sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") == "1"
        )

    def stop_receiving(self) -> None:
        """Cut this standby off its primary: an empty ``primary_conninfo`` (reloaded)
        ends its WAL receiver. Nothing the primary writes afterwards reaches it."""
        if self._conninfo is None:
            self._conninfo = self.sql("SHOW primary_conninfo")
        self.sql("ALTER SYSTEM SET primary_conninfo = ''")
        self.sql("SELECT pg_reload_conf()")
        _wait_for(
            f"{self.name} WAL receiver gone",
            lambda: self.sql("SELECT count(*) FROM pg_stat_wal_receiver") == "0",
        )

    def start_receiving(self) -> None:
        """Undo ``stop_receiving``: stream from the primary again, and wait until it does."""
        if self._conninfo is None:
            return
        quoted = self._conninfo.replace("'", "''")
        self.sql(f"ALTER SYSTEM SET primary_conninfo = '{quoted}'")
        self.sql("SELECT pg_reload_conf()")
        self._conninfo = None
        _wait_for(f"{self.name} streaming again", self.receiving)

    # -- fencing ---------------------------------------------------------------------

    def make_read_only(self) -> None:
        """Fence this server as a failover script does: ``default_transaction_read_only
        = on`` by ALTER SYSTEM and a reload. New transactions then refuse writes with
        SQLSTATE 25006 (read_only_sql_transaction); transactions already open are not
        stopped. Waits until a new connection sees the setting."""
        self.sql("ALTER SYSTEM SET default_transaction_read_only = on")
        self.sql("SELECT pg_reload_conf()")
        _wait_for(
            f"{self.name} read-only",
            lambda: self.sql("SHOW default_transaction_read_only") == "on",
        )

    def make_writable(self) -> None:
        """Undo ``make_read_only``."""
        self.sql("ALTER SYSTEM RESET default_transaction_read_only")
        self.sql("SELECT pg_reload_conf()")
        _wait_for(
            f"{self.name} writable",
            lambda: self.sql("SHOW default_transaction_read_only") == "off",
        )

    def restart_read_only(self) -> None:
        """``make_read_only`` and a fast restart: every session, open transactions too,
        is ended, and every new one is read-only."""
        self.make_read_only()
        self.stop("fast")
        self.start()


class ReplicatedPair:
    """A primary and a standby streaming from it through the replication slot
    ``standby_slot``: synchronous (``synchronous_standby_names = '*'``; a COMMIT
    returns once the standby has applied it, with ``synchronous_commit`` =
    ``remote_apply``, the default here) or asynchronous.

    ``first`` and ``second`` never change (``first`` was the primary when the pair was
    made); ``primary`` and ``standby`` swap on ``switch_over()``, after which
    ``standby`` is the fenced former primary (stopped or read-only, not replicating).
    """

    def __init__(
        self,
        template: Path,
        root: Path,
        *,
        synchronous: bool,
        synchronous_commit: str = "remote_apply",
    ) -> None:
        self.synchronous = synchronous
        self.synchronous_commit = synchronous_commit
        self.first = Cluster.from_template(template, root, "primary")
        self.second = Cluster(root, "standby", self.first.bindir)
        self.primary = self.first
        self.standby = self.second
        self.switched = False
        self.started_in: float | None = None  # seconds start() took
        self.switched_in: float | None = None  # seconds switch_over() took

    def start(self) -> None:
        """Start the primary, make the standby from it and wait until it streams (and,
        synchronous, is the synchronous standby) and has replayed everything."""
        began = time.monotonic()
        self.first.start()
        _run(
            [
                str(self.first.bindir / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.first.port),
                "-U",
                "postgres",
                "-D",
                str(self.second.data),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-C",
                "-S",
                SLOT,
                "--no-sync",
            ],
            cwd=self.second.dir,
        )
        self.second.start()
        _wait_for("standby streaming", self._streaming)
        if self.synchronous:
            # Set after the base backup, so the standby does not inherit it: promoted,
            # it would wait for a synchronous standby of its own that never comes.
            self.first.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            self.first.sql(f"ALTER SYSTEM SET synchronous_commit = '{self.synchronous_commit}'")
            self.first.sql("SELECT pg_reload_conf()")
            _wait_for("standby synchronous", lambda: self._sync_state() == "sync")
        self.wait_caught_up()
        self.started_in = time.monotonic() - began

    def _streaming(self) -> bool:
        return self._sync_state() is not None

    def _sync_state(self) -> str | None:
        state = self.primary.sql(
            "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
        )
        return state or None

    def clusters(self) -> tuple[Cluster, Cluster]:
        return (self.first, self.second)

    def wait_caught_up(self, timeout: float = WAIT) -> None:
        """Wait until the standby has replayed everything the primary has flushed."""
        target = self.primary.sql("SELECT pg_current_wal_flush_lsn()")
        _wait_for(
            "standby caught up",
            lambda: (
                self.standby.sql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") == "t"
            ),
            timeout,
        )

    def pause_replication(self) -> None:
        """The standby stops receiving and replaying: from now on, what the primary
        commits (asynchronous) is lost if it fails over. (Synchronous, commits wait.)"""
        self.standby.stop_receiving()
        self.standby.pause_replay()

    def resume_replication(self) -> None:
        self.standby.resume_replay()
        self.standby.start_receiving()

    def switch_over(
        self, fence: Literal["stop", "immediate", "read_only"] = "stop", *, catch_up: bool = True
    ) -> None:
        """Fence the primary and promote the standby; ``primary`` and ``standby`` swap.

        ``fence``: ``"stop"`` a fast shutdown (it sends the connected standby every WAL
        record first), ``"immediate"`` a crash-like stop, ``"read_only"``
        ``make_read_only()`` (the old primary keeps running, refusing writes).
        ``catch_up``: with ``"read_only"``, and a standby still receiving, first wait
        until the standby has received all the old primary has flushed. Promotion then
        replays whatever the standby has received, paused replay or not.
        """
        began = time.monotonic()
        old, new = self.primary, self.standby
        if self.switched:
            raise RuntimeError("this pair has switched over already")
        if fence == "read_only":
            old.make_read_only()
            if catch_up and new.receiving():
                target = old.sql("SELECT pg_current_wal_flush_lsn()")
                _wait_for(
                    "standby received all",
                    lambda: (
                        new.sql(f"SELECT pg_last_wal_receive_lsn() >= '{target}'::pg_lsn") == "t"
                    ),
                )
        elif fence in ("stop", "immediate"):
            old.stop("fast" if fence == "stop" else "immediate")
        else:
            raise ValueError(f"unknown fence {fence!r}")
        new.promote()
        self.primary, self.standby = new, old
        self.switched = True
        self.switched_in = time.monotonic() - began

    def libpq_url(self, database: str = "postgres") -> str:
        """Both servers in libpq's multi-host form, the primary wherever it is."""
        return (
            f"postgresql+asyncpg://postgres@127.0.0.1:{self.first.port},"
            f"127.0.0.1:{self.second.port}/{database}?target_session_attrs=read-write"
        )

    def host_query_url(self, database: str = "postgres") -> str:
        """Both servers in SQLAlchemy's asyncpg form (``?host=`` twice)."""
        return (
            f"postgresql+asyncpg://postgres@/{database}?host=127.0.0.1:{self.first.port}"
            f"&host=127.0.0.1:{self.second.port}&target_session_attrs=read-write"
        )

    def cleanup(self) -> None:
        for cluster in (self.second, self.first):
            cluster.cleanup()


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} [{REQUIRE_ENV}=1]")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def standby_template() -> Iterator[Path]:
    """An initdb'd data directory, once per session, or a skip (a failure when
    WRITETURN_REQUIRE_STANDBY=1) where the Postgres server binaries cannot run."""
    workdir = Path(tempfile.mkdtemp(prefix="writeturn-standby-template-", dir=temp_root()))
    try:
        try:
            if _is_root():
                _own(workdir)
            elif not os.access(PG_ROOT, os.R_OK):
                raise StandbyUnavailable(f"{PG_ROOT} is not readable")
            template = make_template(workdir)
        except StandbyUnavailable as exc:
            _unavailable(f"no Postgres primary and standby for the failover tests: {exc}")
        yield template
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def replicated_pair(standby_template: Path) -> Iterator[Callable[..., ReplicatedPair]]:
    """``make(synchronous: bool = False, *, synchronous_commit="remote_apply")``: a new,
    started ReplicatedPair; every pair made is removed after the test, failed or not."""
    made: list[tuple[ReplicatedPair | None, Path]] = []

    def make(
        synchronous: bool = False, *, synchronous_commit: str = "remote_apply"
    ) -> ReplicatedPair:
        root = Path(tempfile.mkdtemp(prefix="writeturn-standby-", dir=temp_root()))
        root.chmod(0o755)
        made.append((None, root))
        pair = ReplicatedPair(
            standby_template, root, synchronous=synchronous, synchronous_commit=synchronous_commit
        )
        made[-1] = (pair, root)
        try:
            pair.start()
        except Exception as exc:
            logs = "\n".join(f"--- {c.name}:\n{c.log_tail()}" for c in pair.clusters())
            raise RuntimeError(f"the replicated pair did not start: {exc}\n{logs}") from exc
        return pair

    try:
        yield make
    finally:
        for pair, root in reversed(made):
            if pair is not None:
                pair.cleanup()
            shutil.rmtree(root, ignore_errors=True)
