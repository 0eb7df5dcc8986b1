"""uvicorn's h11 HTTP/1.1 protocol with header and body read timeouts.

uvicorn times out only idle keep-alive connections: a client that opens a connection and trickles
its request headers (one byte every two seconds), or declares a ``Content-Length`` larger than the
body it sends, holds the connection (and, for the body, a request task) for as long as it likes.
:func:`timed_protocol` returns a subclass of uvicorn's ``H11Protocol`` that closes such a
connection:

- **headers**: from the moment the connection opens (or the first byte of a further request on a
  kept-alive connection) until the request's headers are parsed: ``header_timeout`` seconds;
- **body**: from the parsed headers until the end of the body: ``body_timeout`` seconds.

Both are deadlines, not idle timers: sending a byte now and then does not extend them. A closed
connection is logged at INFO; a request whose body never completed sees a client disconnect.

It also caps open connections at ``max_connections``: a connection over the cap gets OpenAI's
error envelope, 503 ``too_many_connections`` with ``Retry-After``, for its request, and is closed
(uvicorn's own ``limit_concurrency`` answers in plain text).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tritonembed.gateway.errors import RETRY_AFTER_SECONDS, ErrorKind, error_body

logger = logging.getLogger("tritonembed.gateway")


class TimedH11Protocol(H11Protocol):
    """``H11Protocol`` plus the two read deadlines (class attributes, set by :func:`timed_protocol`)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # this one included
            logger.warning("%d connections open (limit %d): answering 503 to %s", len(self.connections),
                           self.max_connections, self._peer())
            self.app = over_capacity  # uvicorn runs self.app for each request of this connection
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_timers(received=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_timers(received=False)

    # --- timers -------------------------------------------------------------------------------
    def _update_timers(self, *, received: bool) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:
            if received:  # the first bytes of a request whose headers are not complete yet
                self._arm_header_timer()
            return
        self._cancel(header=True)
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.body_timeout, self._expire, "body", self.body_timeout)
        else:
            self._cancel(body=True)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire, "headers", self.header_timeout)

    def _cancel(self, *, header: bool = False, body: bool = False) -> None:
        if header and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if body and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel(header=True, body=True)

    def _expire(self, what: str, seconds: float) -> None:
        self._header_timer = self._body_timer = None
        if self.transport.is_closing():
            return
        logger.info("closing the connection from %s: request %s not received within %g s", self._peer(), what, seconds)
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"


async def over_capacity(scope: Any, receive: Any, send: Any) -> None:
    """The answer on a connection over the cap: 503 in OpenAI's envelope, then the connection closes."""
    kind = ErrorKind.TOO_MANY_CONNECTIONS
    body = json.dumps(error_body(kind, "the gateway has too many open connections; retry later")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(RETRY_AFTER_SECONDS).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": kind.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def timed_protocol(header_timeout: float, body_timeout: float, max_connections: int = 1024) -> type[TimedH11Protocol]:
    """A :class:`TimedH11Protocol` subclass with these limits, for ``uvicorn.Config(http=...)``."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {
        "header_timeout": float(header_timeout), "body_timeout": float(body_timeout), "max_connections": int(max_connections),
    })
