"""writeturn inside an ASGI service: a lifespan, a middleware and a dependency.

Everything here is plain ASGI and imports no web framework; it works with
Starlette, FastAPI or a bare ASGI callable under uvicorn or hypercorn.

- :class:`SerializerLifespan` starts one serializer before the first request
  and, at shutdown, waits (bounded) for the requests still in flight before it
  drains the serializer (bounded too). Pass it as a framework's ``lifespan=``,
  or wrap a bare ASGI app with :meth:`SerializerLifespan.wrap`.
  :meth:`SerializerLifespan.serializer` is a FastAPI dependency.
- :class:`WriteturnMiddleware` cancels a request's handler when its client
  disconnects (ASGI servers do not), so writeturn's cancellation guarantees
  apply to abandoned requests: a write still queued is withdrawn, a running one
  rolls back, a committing one finishes. It also counts requests in flight for
  the lifespan, and can bound a handler's time (``timeout=``, answered with 504).

Why no "transaction per request" dependency: a FastAPI ``yield`` dependency
wrapped around ``ser.transaction()`` commits after the endpoint has returned,
when the response (a 200) is already chosen and may already be sent. A failed
COMMIT then cannot change it, and the client is told the write happened when
it did not. Await the write inside the endpoint (``await ser.run(...)``) and
build the response from its outcome instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from ._options import is_seconds
from .errors import ConfigurationError, SerializerClosed, SerializerNotStarted
from .serializer import WriteSerializer

__all__ = ["SerializerLifespan", "WriteturnMiddleware", "ASGIApp"]

log = logging.getLogger("writeturn.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _check_seconds(name: str, value: float | None, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if not is_seconds(value, allow_zero=False):
        example = f"{name}=10.0" + (f" or {name}=None (no bound)" if allow_none else "")
        raise ConfigurationError(
            f"{name}={value!r} must be a positive number of seconds, e.g. {example}"
        )
    return float(value)  # type: ignore[arg-type]


class SerializerLifespan:
    """One started serializer for an ASGI app's life: no request sees it unstarted, and
    shutdown closes it only after the requests in flight have ended.

    At startup the serializer is created (``serializer`` may be a
    :class:`WriteSerializer` or a function returning one, called in the
    server's event loop) and started; a database that does not answer fails
    the startup. At shutdown it waits up to ``handler_timeout`` seconds for the
    requests still running (those counted by :class:`WriteturnMiddleware` or
    :meth:`wrap`), then closes the serializer with
    ``close(drain=True, timeout=drain_timeout)``: queued writes run for at most
    ``drain_timeout`` seconds, the rest are stopped, and every handle is settled
    before the server exits.

    Example (Starlette; FastAPI takes the same ``lifespan=``)::

        writes = SerializerLifespan(lambda: WriteSerializer.from_url(URL))
        app = Starlette(routes=routes, lifespan=writes)
        app.add_middleware(WriteturnMiddleware, lifespan=writes)

        async def endpoint(request):
            await writes.serializer().run(fn, key=...)

    Use one instance per app and process (each server worker has its own).
    """

    def __init__(
        self,
        serializer: WriteSerializer | Callable[[], WriteSerializer],
        *,
        handler_timeout: float = 10.0,
        drain_timeout: float = 10.0,
    ) -> None:
        if not isinstance(serializer, WriteSerializer) and not callable(serializer):
            raise ConfigurationError(
                f"SerializerLifespan needs a WriteSerializer or a function returning one, got "
                f"{type(serializer).__name__}; e.g. "
                "SerializerLifespan(lambda: WriteSerializer.from_url(url))"
            )
        self._source = serializer
        self._handler_timeout = _check_seconds("handler_timeout", handler_timeout, allow_none=False)
        self._drain_timeout = _check_seconds("drain_timeout", drain_timeout, allow_none=False)
        self._serializer: WriteSerializer | None = None
        self._stopped = False  # a shutdown has closed a serializer
        # Invariants: _requests == the number of requests counted by _request() that
        # have not ended; _no_requests, while a shutdown waits on it, is set exactly
        # when _requests == 0.
        self._requests = 0
        # Made by the shutdown that waits on it, in that shutdown's event loop: an
        # asyncio primitive binds to the first loop that waits on it, and an app may be
        # started again on another loop (a test client per test, asyncio.run() twice).
        self._no_requests: asyncio.Event | None = None

    # -- the started serializer -------------------------------------------------

    def serializer(self) -> WriteSerializer:
        """The started serializer. Also a FastAPI dependency: ``Depends(writes.serializer)``.

        Raises :class:`SerializerNotStarted` before the lifespan has started and
        :class:`SerializerClosed` after its shutdown.
        """
        if self._serializer is None and self._stopped:
            raise SerializerClosed(
                "the app has shut down: its SerializerLifespan closed the serializer"
            )
        if self._serializer is None:
            raise SerializerNotStarted(
                "the app's SerializerLifespan has not started: pass it as the framework's "
                "lifespan= (Starlette(lifespan=writes), FastAPI(lifespan=writes)) or wrap the "
                "ASGI app with writes.wrap(app), and run the app under a server that sends "
                "lifespan events (uvicorn --lifespan on)"
            )
        return self._serializer

    @property
    def requests_in_flight(self) -> int:
        """Requests counted by the middleware (or :meth:`wrap`) that have not ended."""
        return self._requests

    # -- startup and shutdown -----------------------------------------------------

    async def startup(self) -> None:
        """Create and start the serializer. Idempotent while running.

        After a shutdown, a factory makes a new serializer (an app may be started
        again, e.g. by a test client per test); a serializer given as an instance
        cannot be restarted.
        """
        if self._serializer is not None:
            return
        source = self._source
        if isinstance(source, WriteSerializer) and self._stopped:
            raise SerializerClosed(
                "this SerializerLifespan was given a WriteSerializer, which was closed at the "
                "last shutdown; give it a function that creates one to start the app again, "
                "e.g. SerializerLifespan(lambda: WriteSerializer.from_url(url))"
            )
        ser = source if isinstance(source, WriteSerializer) else source()
        if not isinstance(ser, WriteSerializer):
            raise ConfigurationError(
                f"the SerializerLifespan's factory returned {type(ser).__name__}, not a "
                "WriteSerializer; e.g. lambda: WriteSerializer.from_url(url)"
            )
        await ser.start()
        self._serializer = ser

    async def shutdown(self) -> None:
        """Wait (bounded) for the requests in flight, then drain and close the serializer."""
        ser = self._serializer
        if self._requests:
            log.info("shutdown: waiting for %d request(s) in flight", self._requests)
            self._no_requests = no_requests = asyncio.Event()
            try:
                await asyncio.wait_for(no_requests.wait(), self._handler_timeout)
            except TimeoutError:
                log.warning(
                    "shutdown: %d request(s) still running after handler_timeout=%ss; "
                    "draining the serializer with them running (their writes that are "
                    "stopped raise SerializerClosed)",
                    self._requests,
                    self._handler_timeout,
                )
            finally:
                self._no_requests = None
        if ser is not None:
            try:
                await ser.close(drain=True, timeout=self._drain_timeout)
            finally:
                self._serializer = None
                self._stopped = True

    @contextlib.asynccontextmanager
    async def _context(self) -> AsyncIterator[None]:
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    def __call__(self, app: object) -> contextlib.AbstractAsyncContextManager[None]:
        """The lifespan form Starlette and FastAPI take: ``lifespan=writes``."""
        return self._context()

    # -- requests in flight ---------------------------------------------------------

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        self._requests += 1
        try:
            yield
        finally:
            self._requests -= 1
            assert self._requests >= 0
            if self._requests == 0 and self._no_requests is not None:
                self._no_requests.set()

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """A bare ASGI app with this lifespan: answers the server's lifespan events and
        counts the app's HTTP requests, so shutdown waits for them.

        The wrapped app's own lifespan events are not forwarded: with a
        framework, pass this object as its ``lifespan=`` instead.
        """
        return _LifespanApp(app, self)

    def __repr__(self) -> str:
        state = "started" if self._serializer is not None else "not started"
        return f"<SerializerLifespan {state}, {self._requests} request(s) in flight>"


class _LifespanApp:
    def __init__(self, app: ASGIApp, lifespan: SerializerLifespan) -> None:
        self.app = app
        self.lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            with self.lifespan._request():
                await self.app(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.lifespan.startup()
                except Exception as exc:
                    # writeturn's errors never contain a password.
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.lifespan.shutdown()
                except Exception as exc:
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return


class WriteturnMiddleware:
    """Cancels a request's handler when its client disconnects before the response is
    complete, so a write it awaits is withdrawn or rolled back instead of finishing
    for nobody; the handler's cleanup always completes before the request ends.

    Pure ASGI (``app.add_middleware(WriteturnMiddleware, lifespan=writes)`` in
    Starlette and FastAPI, or ``WriteturnMiddleware(app)`` around any ASGI app).
    For each HTTP request the handler runs in a task of its own while the
    middleware waits on the server's ``receive()`` for ``http.disconnect``;
    request body messages are passed on to the handler in order, one at a time,
    none held back or dropped. A disconnect that arrives after the response is
    complete (while background tasks run) cancels nothing.

    - ``lifespan``: the :class:`SerializerLifespan` whose shutdown waits for
      the requests counted here.
    - ``cancel_on_disconnect=False`` only counts requests.
    - ``timeout``: seconds a handler may run before it is cancelled; if no
      response has started then, the client gets ``504 Gateway Timeout``.

    If the server cancels the request (uvicorn does at the end of
    ``--timeout-graceful-shutdown``), the handler is cancelled and its cleanup
    awaited before the cancellation goes on.
    """

    def __init__(
        self,
        app: ASGIApp,
        lifespan: SerializerLifespan | None = None,
        *,
        cancel_on_disconnect: bool = True,
        timeout: float | None = None,
    ) -> None:
        if lifespan is not None and not isinstance(lifespan, SerializerLifespan):
            raise ConfigurationError(
                f"lifespan={lifespan!r} is not a SerializerLifespan; pass the object you gave "
                "the app as lifespan=, or None"
            )
        self.app = app
        self.lifespan = lifespan
        self.cancel_on_disconnect = bool(cancel_on_disconnect)
        self.timeout = _check_seconds("timeout", timeout, allow_none=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.lifespan._request() if self.lifespan is not None else contextlib.nullcontext():
            if not self.cancel_on_disconnect and self.timeout is None:
                await self.app(scope, receive, send)
            else:
                await _Request(self, scope, receive, send).run()


class _Request:
    """One HTTP request under :class:`WriteturnMiddleware`."""

    def __init__(self, mw: WriteturnMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        self.mw = mw
        self.scope = scope
        self.server_receive = receive
        self.server_send = send
        # One message at a time: a body is never read ahead of the handler by more
        # than one message, so flow control still applies.
        self.inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.stopped_by: str | None = None  # "disconnect" or "timeout" once we cancel
        self.handler: asyncio.Task[None] | None = None

    async def receive(self) -> Message:
        if self.disconnected and self.inbox.empty():
            return {"type": "http.disconnect"}
        return await self.inbox.get()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_complete = True
        await self.server_send(message)

    def _stop(self, why: str) -> None:
        assert self.handler is not None
        if self.stopped_by is None and not self.handler.done():
            self.stopped_by = why
            self.handler.cancel()

    async def _watch(self) -> None:
        """The only reader of the server's receive(): hands messages on, spots disconnects."""
        while True:
            message = await self.server_receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                if self.mw.cancel_on_disconnect and not self.response_complete:
                    self._stop("disconnect")
                await self.inbox.put(message)
                return
            await self.inbox.put(message)

    async def _call_app(self) -> None:
        await self.mw.app(self.scope, self.receive, self.send)

    async def run(self) -> None:
        handler = self.handler = asyncio.create_task(self._call_app())
        watcher = asyncio.create_task(self._watch())
        try:
            try:
                await asyncio.wait({handler}, timeout=self.mw.timeout)
                if not handler.done():
                    self._stop("timeout")
                await asyncio.wait({handler})
            except asyncio.CancelledError:
                # The server cancelled the request: the handler's cleanup (a write's
                # rollback) completes before the cancellation goes on.
                handler.cancel()
                await _settle(handler)
                raise
        finally:
            watcher.cancel()
            await _settle(watcher)
        if handler.cancelled() and self.stopped_by is not None:
            if self.stopped_by == "disconnect":
                log.info("client disconnected: cancelled %s %s", *_describe(self.scope))
            else:
                log.warning(
                    "handler ran longer than timeout=%ss: cancelled %s %s",
                    self.mw.timeout,
                    *_describe(self.scope),
                )
                if not self.response_started and not self.disconnected:
                    await self._send_504()
            return
        handler.result()  # the handler's own exception or cancellation goes on to the server

    async def _send_504(self) -> None:
        body = f"handler timed out after {self.mw.timeout}s\n".encode()
        await self.server_send(
            {
                "type": "http.response.start",
                "status": 504,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await self.server_send({"type": "http.response.body", "body": body})


async def _settle(task: asyncio.Task[None]) -> None:
    """Wait until ``task`` has ended, even if this task is cancelled meanwhile.

    A cancellation that lands here is held until ``task`` has ended, then raised
    once. It is not uncancel()ed, so an enclosing ``asyncio.timeout()`` still
    turns it into ``TimeoutError``.
    """
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _describe(scope: Scope) -> tuple[str, str]:
    return str(scope.get("method", "?")), str(scope.get("path", "?"))
