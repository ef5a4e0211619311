"""A TCP relay to Postgres that a test can cut around COMMIT, or make refuse connections."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.engine import make_url


class CuttingProxy:
    """A TCP relay to Postgres. Once armed, it cuts the next connection that sends COMMIT:
    either before the COMMIT reaches the server ("before": the transaction never commits),
    or just after the server answered it ("after": it committed; the client never hears).
    refuse() drops every connection and refuses new ones until accept(). hold() keeps
    what the server sends until release(), which delivers it in one piece: a result
    and a FATAL error that followed it reach the client in the same read."""

    def __init__(self, url: str, where: str = "after") -> None:
        u = make_url(url)
        self.target = make_url(url)
        self.host, self.port, self.where = u.host or "127.0.0.1", u.port or 5432, where
        self.armed = False
        #: After the cut, stop listening: the database is unreachable until accept().
        self.refuse_on_cut = False
        self.cuts = 0
        self.was_cut = asyncio.Event()
        self.listen_port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        #: While held: per connection, what the server sent, and whether it then closed.
        self.held: dict[asyncio.StreamWriter, tuple[bytearray, asyncio.Event]] | None = None
        self.released = asyncio.Event()
        self.linger = 0.0

    async def __aenter__(self) -> CuttingProxy:
        await self.accept()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.refuse()

    async def accept(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)
        self.listen_port = self.server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def hold(self) -> None:
        """Keep what the server sends, on every connection, until release()."""
        self.held, self.released = {}, asyncio.Event()

    def release(self, linger: float) -> None:
        """Deliver what was held, one write per connection; where the server closed
        meanwhile, close the client's side ``linger`` seconds later."""
        held, self.held = self.held or {}, None
        for cwriter, (data, _) in held.items():
            cwriter.write(bytes(data))
        self.linger = linger
        self.released.set()

    def closed_while_held(self) -> int:
        """How many held connections the server has closed."""
        return sum(eof.is_set() for _, eof in (self.held or {}).values())

    @property
    def url(self) -> str:
        proxied = self.target.set(host="127.0.0.1", port=self.listen_port)
        return proxied.render_as_string(hide_password=False)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            sreader, swriter = await asyncio.open_connection(self.host, self.port)
        except BaseException:
            cwriter.transport.abort()
            self.tasks.discard(task)
            raise
        committing = asyncio.Event()

        def cut() -> None:
            self.cuts += 1
            self.was_cut.set()
            if self.refuse_on_cut and self.server is not None:
                self.server.close()
                self.server = None
            cwriter.transport.abort()
            swriter.transport.abort()

        async def up() -> None:
            while data := await creader.read(65536):
                if self.armed and b"COMMIT" in data:
                    self.armed = False
                    if self.where == "before":
                        cut()
                        return
                    committing.set()
                swriter.write(data)
                await swriter.drain()

        async def down() -> None:
            while True:
                data = await sreader.read(65536)
                if self.held is not None:
                    kept, eof = self.held.setdefault(cwriter, (bytearray(), asyncio.Event()))
                    kept += data
                    if data:
                        continue
                    eof.set()
                    await self.released.wait()
                    await asyncio.sleep(self.linger)
                    return
                if not data:
                    return
                if committing.is_set():
                    cut()  # COMMIT's answer: the server committed; drop it on the floor
                    return
                cwriter.write(data)
                await cwriter.drain()

        pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            # When either side closes, close the other: each side waits for that.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cwriter.transport.abort()
            swriter.transport.abort()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self.tasks.discard(task)


PROXIED: dict[str, Any] = {"connect_args": {"ssl": False, "timeout": 2}}
