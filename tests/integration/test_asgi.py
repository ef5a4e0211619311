"""writeturn.asgi under real ASGI servers (uvicorn, hypercorn) with a real HTTP client.

The service (_asgi_service.py, FastAPI with SerializerLifespan, WriteturnMiddleware and
the serializer handed out by a dependency) runs in a server subprocess on a free
loopback port. It reports every write's outcome once its handle has settled, and a
"closed" line once its lifespan has closed the serializer. After each run the database
is compared with the reports:

- every write reported COMMITTED has its ledger row exactly once, and no other write has one;
- each key's counter equals its number of rows, so no write is half-applied;
- no advisory lock and no session idle in transaction is left (Postgres);
- the server exits cleanly after its lifespan shutdown has run, and the lifespan closed the
  serializer only after the last handler had reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._db import counter, create_tables, ledger, pg_leftovers, serializer

HERE = Path(__file__).parent
EXAMPLES = HERE.parent.parent / "examples"
KEYS = ("k0", "k1", "k2")
STARTUP_LIMIT = 30.0
AUDIT = 100_000  # _asgi_service.AUDIT: a cancelled handler's audit write has id AUDIT + id
SETTLE_LIMIT = 15.0  # generous: every write here settles in well under a second once stopped
LONG = 30.0  # a write pause no test waits for: a write that is not stopped never settles
NO_TIMEOUT = 60.0  # a middleware timeout that never fires here


def ended_by(log: str) -> set[str]:
    """The exception types that end the tracebacks in a server's log."""
    lines = log.splitlines()
    found = set()
    for n, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            last = next((x for x in lines[n + 1 :] if x and not x.startswith(" ")), "?")
            found.add(last.split(":")[0])
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a server process; its stdout and stderr go to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    report: Path
    stderr: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self) -> list[dict[str, Any]]:
        if not self.report.exists():
            return []
        return [json.loads(line) for line in self.report.read_text().splitlines() if line]

    async def wait_running(self, i: int) -> None:
        """Wait until write ``i``'s function has started."""
        deadline = time.monotonic() + SETTLE_LIMIT
        while not any(line.get("running") == i for line in self.lines()):
            if time.monotonic() > deadline:
                raise AssertionError(f"write {i} did not start within {SETTLE_LIMIT}s")
            await asyncio.sleep(0.02)

    def writes(self) -> dict[int, dict[str, Any]]:
        found = [line for line in self.lines() if "outcome" in line]
        twice = [i for i, n in Counter(line["id"] for line in found).items() if n > 1]
        assert twice == [], f"writes reported twice: {twice}"
        return {line["id"]: line for line in found}

    def handled(self) -> set[int]:
        """The requests whose handler started (and so submitted a write)."""
        return {line["handler"] for line in self.lines() if "handler" in line}

    async def wait_reported(
        self,
        ids: set[int],
        *,
        if_handled: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> dict[int, dict[str, Any]]:
        """Wait until every write of ``ids`` settled; of ``if_handled``, those whose
        request reached its handler (a client may leave before that)."""
        deadline = time.monotonic() + SETTLE_LIMIT
        while True:
            writes = self.writes()
            missing = (ids | ((if_handled or set()) & self.handled())) - set(writes)
            if not missing:
                return writes
            if time.monotonic() > deadline:
                raise AssertionError(f"writes not settled within {SETTLE_LIMIT}s: {missing}")
            await asyncio.sleep(0.05)

    async def stop(self, exit_limit: float = 20.0) -> str:
        """SIGTERM, wait for the exit, check it was clean; return stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + exit_limit
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.kind} did not exit within {exit_limit}s of SIGTERM")
            await asyncio.sleep(0.05)
        err = self.stderr.read_text()
        # uvicorn raises the captured SIGTERM again once it has shut down; hypercorn exits 0.
        assert self.proc.returncode in (0, -signal.SIGTERM), (self.proc.returncode, err[-3000:])
        # The only tracebacks allowed are the servers' logs of tasks they cancelled at the
        # end of their graceful timeout (the middleware lets such a cancellation go on
        # once the handler's write has settled).
        assert ended_by(err) <= {"asyncio.exceptions.CancelledError"}, err[-3000:]
        if self.kind == "uvicorn":
            assert "Application shutdown complete" in err, err[-3000:]
        lines = self.lines()
        closed = [n for n, line in enumerate(lines) if line.get("event") == "closed"]
        assert closed == [len(lines) - 1], (
            "the lifespan closed the serializer before a handler ended"
        )
        committed = sum(1 for line in lines if line.get("outcome") == "committed")
        assert lines[-1]["stats_committed"] == committed
        return err


async def start_server(
    kind: str, url: str, tmp_path: Path, *, timeout: float = NO_TIMEOUT, graceful: int = 5
) -> Server:
    port = free_port()
    report = tmp_path / f"report-{port}.jsonl"
    stderr = tmp_path / f"stderr-{port}.txt"
    if kind == "uvicorn":
        cmd = [
            sys.executable, "-m", "uvicorn", "_asgi_service:app", "--host", "127.0.0.1",
            "--port", str(port), "--timeout-graceful-shutdown", str(graceful),
        ]  # fmt: skip
    else:
        cmd = [
            sys.executable, "-m", "hypercorn", "_asgi_service:app",
            "--bind", f"127.0.0.1:{port}", "--graceful-timeout", str(graceful),
        ]  # fmt: skip
    env = {**os.environ, "WT_ASGI_URL": url, "WT_ASGI_REPORT": str(report)}
    env["WT_ASGI_TIMEOUT"] = str(timeout)
    proc = spawn(cmd, HERE, env, stderr)
    server = Server(kind, proc, port, report, stderr)
    deadline = time.monotonic() + STARTUP_LIMIT
    async with httpx.AsyncClient(base_url=server.base, timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{kind} exited {proc.returncode}: {stderr.read_text()}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{kind} not ready in {STARTUP_LIMIT}s: {stderr.read_text()}")
            await asyncio.sleep(0.1)


async def check_database(url: str, writes: dict[int, dict[str, Any]]) -> None:
    """Rows are exactly the writes reported COMMITTED; counters match; nothing left held."""
    committed = {i for i, line in writes.items() if line["outcome"] == "committed"}
    async with serializer(url) as check:
        rows = await ledger(check.engine)
        counters = {key: await counter(check.engine, key) for key in KEYS}
        leftovers = await pg_leftovers(check.engine)
    seqs = Counter(seq for _, _, _, seq in rows)
    assert [s for s, n in seqs.items() if n > 1] == [], "a write was applied twice"
    assert set(seqs) - committed == set(), "rows of writes not reported COMMITTED"
    assert committed - set(seqs) == set(), "writes reported COMMITTED are missing"
    for _, key, _, seq in rows:
        assert key == writes[seq]["key"]
    per_key = Counter(key for _, key, _, _ in rows)
    assert counters == {key: per_key[key] for key in KEYS}, "a write was half-applied"
    assert leftovers == (0, 0), "advisory locks held / sessions idle in transaction"


@pytest.fixture
async def tables(db_url: str) -> str:
    async with serializer(db_url) as ser:
        await create_tables(ser.engine, *KEYS)
    return db_url


SERVERS = ["uvicorn", "hypercorn"]


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_client_that_disconnects_gets_its_write_stopped(
    tables: str, tmp_path: Path, kind: str
) -> None:
    """Clients that leave mid-request: their writes are withdrawn or rolled back, at once.

    An abandoned request's write would sleep LONG seconds, so only a cancellation can
    settle it within SETTLE_LIMIT; the writes of clients that stay commit. Some clients
    leave after a seeded delay, wherever their write is then (queued or running); two
    leave only once their write is running, so a running write is certainly stopped.
    """
    rng = random.Random(12)
    plan = []
    for i in range(24):
        what = "stay" if rng.random() < 0.6 else "abandon"
        plan.append((i, KEYS[i % len(KEYS)], "abandon-running" if i in (0, 4) else what))
    delays = {i: rng.uniform(0.1, 0.4) for i, *_ in plan}
    server = await start_server(kind, tables, tmp_path)
    try:
        limits = httpx.Limits(max_connections=len(plan))
        async with httpx.AsyncClient(base_url=server.base, timeout=20, limits=limits) as client:

            async def request(i: int, key: str, what: str) -> int | str:
                if what == "stay":
                    params = {"id": i, "key": key, "pause": delays[i] / 10}
                    return (await client.post("/write", params=params)).status_code
                params = {"id": i, "key": key, "pause": LONG}
                post = asyncio.create_task(client.post("/write", params=params))
                if what == "abandon-running":
                    await server.wait_running(i)
                else:
                    await asyncio.wait({post}, timeout=delays[i])
                if post.done():
                    return f"answered {post.result().status_code}"
                post.cancel()  # cancelling httpx closes the socket
                await asyncio.gather(post, return_exceptions=True)
                return "left"

            results = await asyncio.gather(*(request(*p) for p in plan))
        stays = {i for i, _, what in plan if what == "stay"}
        writes = await server.wait_reported(
            stays | {0, 4}, if_handled={i for i, *_ in plan} - stays
        )
        # While the server still runs: nothing is held for the abandoned writes.
        await check_database(tables, writes)
    finally:
        await server.stop()
    for (i, _, what), result in zip(plan, results, strict=True):
        if what == "stay":
            assert (result, writes[i]["outcome"]) == (200, "committed"), writes[i]
            continue
        assert result == "left"
        if i not in writes:  # the client left before its request reached the handler
            assert i not in server.handled()
            continue
        assert writes[i]["error"] == "CancelledError", writes[i]
        if what == "abandon-running":
            assert writes[i]["outcome"] == "rolled_back", writes[i]
        else:
            assert writes[i]["outcome"] in ("rolled_back", "withdrawn"), writes[i]
    await check_database(tables, server.writes())


async def test_handler_timeouts_end_with_504_and_nothing_written(
    tables: str, tmp_path: Path
) -> None:
    """A write's own timeout= and the middleware's handler timeout both answer 504; the
    write is rolled back (or withdrawn) and the key serves the next write."""
    rng = random.Random(7)
    plan: list[tuple[int, str, str]] = []
    for i in range(12):
        plan.append((i, KEYS[i % len(KEYS)], rng.choice(["ok", "ok", "write-timeout", "handler"])))
    server = await start_server("uvicorn", tables, tmp_path, timeout=2.0)
    try:
        async with httpx.AsyncClient(base_url=server.base, timeout=20) as client:

            async def request(i: int, key: str, what: str) -> httpx.Response:
                params: dict[str, Any] = {"id": i, "key": key, "pause": 0.02}
                if what == "write-timeout":
                    params.update(pause=LONG, timeout=0.3)
                elif what == "handler":
                    params.update(pause=LONG)
                return await client.post("/write", params=params)

            # The stopped writes first, all at once; then the others, which must find
            # every key free again.
            stopped = [p for p in plan if p[2] != "ok"]
            later = [p for p in plan if p[2] == "ok"]
            responses = await asyncio.gather(*(request(*p) for p in stopped))
            responses += await asyncio.gather(*(request(*p) for p in later))
            plan = stopped + later
        writes = await server.wait_reported({i for i, *_ in plan})
    finally:
        await server.stop()
    for (i, _, what), response in zip(plan, responses, strict=True):
        outcome, error = writes[i]["outcome"], writes[i]["error"]
        if what == "ok":
            assert (response.status_code, outcome) == (200, "committed"), (response.text, outcome)
        elif what == "write-timeout":
            assert response.status_code == 504 and response.json() == {"error": "TurnTimeout"}
            assert (outcome, error) in {
                ("rolled_back", "TurnTimeout"),
                ("withdrawn", "TurnTimeout"),
            }
        else:
            assert response.status_code == 504 and "handler timed out" in response.text
            assert outcome in ("rolled_back", "withdrawn") and error == "CancelledError"
    assert {what for _, _, what in plan} == {"ok", "write-timeout", "handler"}
    await check_database(tables, writes)


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize("seed", [1, 2])
async def test_sigterm_during_load_loses_nothing_reported_committed(
    tables: str, tmp_path: Path, kind: str, seed: int
) -> None:
    """SIGTERM while clients keep writing, some writes outlasting the server's graceful
    timeout. Every 200 is in the database; the lifespan waits for the handlers."""
    rng = random.Random(seed)
    server = await start_server(kind, tables, tmp_path, graceful=1)
    ids = iter(range(10_000))
    statuses: dict[int, int | str] = {}
    ok = 0
    started = asyncio.Event()

    async def client_loop(key: str, pause: float, rounds: int, audit: bool = False) -> None:
        nonlocal ok
        async with httpx.AsyncClient(base_url=server.base, timeout=20) as client:
            for _ in range(rounds):  # bounded: the signal normally ends the loop long before
                i = next(ids)
                params = {"id": i, "key": key, "pause": pause or rng.uniform(0.005, 0.03)}
                params["audit"] = int(audit)
                try:
                    response = await client.post("/write", params=params)
                except httpx.TransportError as exc:
                    statuses[i] = type(exc).__name__
                    return
                statuses[i] = response.status_code
                if response.status_code != 200:
                    return
                ok += 1
                if ok >= 10:
                    started.set()

    # Four clients write briefly to k0 and k1, over and over.
    clients = [asyncio.create_task(client_loop(KEYS[c % 2], 0, 40)) for c in range(4)]
    try:
        await asyncio.wait_for(started.wait(), STARTUP_LIMIT)
        # Two writes to k2 that outlast the server's graceful timeout: SIGTERM finds one
        # running and (on SQLite, one writer at a time) the other possibly queued.
        # Their handlers, once cancelled, write an audit record before they end.
        clients += [asyncio.create_task(client_loop("k2", 3.0, 1, True)) for _ in range(2)]
        await asyncio.sleep(rng.uniform(0.2, 0.4))
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
        await server.stop()
        print(f"server exited {time.monotonic() - signalled:.2f}s after SIGTERM")
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    writes = server.writes()
    # Every request the server took has been reported, and every 200 was a commit.
    assert {i for i in writes if i < AUDIT} <= set(statuses)
    for i, status in statuses.items():
        if status == 200:
            assert writes[i]["outcome"] == "committed", writes[i]
    outcomes = Counter(line["outcome"] for line in writes.values())
    assert outcomes["unknown"] == 0
    long_writes = [line for i, line in writes.items() if line["key"] == "k2" and i < AUDIT]
    # The long writes in flight at SIGTERM outlasted the graceful timeout. uvicorn
    # cancels such handlers, and their writes rolled back (or were withdrawn); hypercorn
    # may let them finish (seen on Python 3.12), and then they committed.
    stopped = [line for line in long_writes if line["outcome"] != "committed"]
    assert len(long_writes) == 2, long_writes
    if kind == "uvicorn":
        assert stopped, long_writes
    assert all(line["error"] == "CancelledError" for line in stopped), stopped
    # The lifespan waited for those handlers: their audit writes, made after the
    # server had cancelled them and started the shutdown, committed.
    for line in stopped:
        assert writes.get(AUDIT + line["id"], {}).get("outcome") == "committed", writes
    await check_database(tables, writes)


async def test_the_example_service_runs_under_uvicorn(db_url: str, tmp_path: Path) -> None:
    """examples/asgi_service.py as a user would run it: concurrent deposits add up."""
    port = free_port()
    log = tmp_path / "example.txt"
    env = {**os.environ, "DATABASE_URL": db_url}
    cmd = [
        sys.executable, "-m", "uvicorn", "asgi_service:app", "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    proc = spawn(cmd, EXAMPLES, env, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            deadline = time.monotonic() + STARTUP_LIMIT
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if (await client.get("/accounts/1")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)

            async def deposit(account: int, amount: int) -> httpx.Response:
                return await client.post(f"/accounts/{account}/deposit", json={"amount": amount})

            rng = random.Random(3)
            amounts = [(rng.randint(1, 2), rng.randint(1, 100)) for _ in range(40)]
            responses = await asyncio.gather(*(deposit(a, n) for a, n in amounts))
            assert [r.status_code for r in responses] == [200] * len(amounts)
            for account in (1, 2):
                balance = (await client.get(f"/accounts/{account}")).json()["balance"]
                assert balance == sum(n for a, n in amounts if a == account)
            bad = await client.post("/accounts/1/deposit", json={"amount": "ten"})
            assert bad.status_code == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log.read_text()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out, out


async def test_a_bare_asgi_app_gets_the_lifespan_and_whole_bodies(
    tables: str, tmp_path: Path
) -> None:
    """SerializerLifespan.wrap with no framework; large bodies pass the middleware whole."""
    port = free_port()
    log = tmp_path / "bare.txt"
    env = {**os.environ, "WT_ASGI_URL": tables}
    cmd = [
        sys.executable, "-m", "uvicorn", "_asgi_bare:app", "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    proc = spawn(cmd, HERE, env, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            deadline = time.monotonic() + STARTUP_LIMIT
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if (await client.get("/")).text == "up":
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            # Bodies of several messages each (uvicorn hands on what each read brought).
            sizes = [1, 70_000, 2_000_000]
            bodies = [f"{i}".encode() + b" " * size for i, size in enumerate(sizes)]
            responses = await asyncio.gather(*(client.post("/", content=b) for b in bodies))
            assert [r.text for r in responses] == [f"{i} {len(b)}" for i, b in enumerate(bodies)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log.read_text()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out, out
    await check_database(tables, {i: {"key": "k0", "outcome": "committed"} for i in range(3)})


async def test_an_unreachable_database_fails_the_startup_without_the_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/app"  # nothing listens there
    log = tmp_path / "bare.txt"
    cmd = [
        sys.executable, "-m", "uvicorn", "_asgi_bare:app", "--host", "127.0.0.1",
        "--port", str(free_port()),
    ]  # fmt: skip
    proc = spawn(cmd, HERE, {**os.environ, "WT_ASGI_URL": url}, log)
    try:
        await asyncio.wait_for(asyncio.to_thread(proc.wait), STARTUP_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode != 0, out
    assert "cannot reach postgresql+asyncpg://app:***@127.0.0.1" in out, out
    assert "s3cret" not in out, out
