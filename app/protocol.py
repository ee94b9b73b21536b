"""uvicorn's httptools protocol, with the read limits it lacks.

uvicorn bounds neither how long a client may take to send its request headers nor how large
they may grow (its httptools parser concatenates a header value as it arrives): a connection
that sends nothing, half its headers, or an endless header holds a socket and memory for as
long as the client likes, and a few thousand of them exhaust the server's file descriptors.
Here a connection gets `read_timeout_s` to send each request's headers, and at most
`MAX_HEAD_BYTES` of them; past either, it is answered 408 or 431 (JSON, as every error of
this service) and closed. A stalled *body* is the app's to time out (`main.ReadTimeout`),
where the answer goes through the normal error path.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("app.protocol")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; browsers send a few KB at most
LINGER_S = 2.0  # after a refusal, how long what the client still sends is read and dropped


def guarded_protocol(read_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's `http=` option, with this read timeout."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "read_timeout_s": read_timeout_s,
    })  # fmt: skip


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    read_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._expect_head()  # the first request must come, like any later one

    def _expect_head(self) -> None:
        self._reading_head = True
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.read_timeout_s, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client still sends after its answer: read and dropped
        if self._reading_head:
            # Counted before parsing, chunk by chunk: the parser would buffer it all first.
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(
                    431,
                    "headers_too_large",
                    f"the request line and headers are over {MAX_HEAD_BYTES:,} bytes",
                )
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A new request on a kept-alive connection (between requests, uvicorn's keep-alive
        # timeout closes an idle one); the first request's clock started at connection.
        if not self._reading_head:
            self._expect_head()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._reading_head:
            return
        if self._head_bytes == 0 and self.cycle is None:
            self.transport.close()  # connected and silent (a browser's spare connection)
            return
        self._refuse(
            408,
            "request_timeout",
            f"the request headers did not arrive within {self.read_timeout_s:g} s "
            "(APP_READ_TIMEOUT_S); send the request again",
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes it cannot parse as HTTP, in JSON like every other error
        (uvicorn logs it)."""
        self._refuse(400, "bad_request", f"{msg.rstrip('.')}: not a valid HTTP/1.1 request", False)

    def _refuse(self, status: int, code: str, detail: str, log_it: bool = True) -> None:
        if log_it:
            log.warning("%s from %s: %s", status, self.client, detail)
        body = json.dumps({"error": code, "detail": detail}).encode()
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self._reading_head, self._refused = False, True
        # A lingering close: closing with unread input makes the kernel reset the connection,
        # and a client still sending would lose the answer. So close our side for writing,
        # drop what still comes for a moment, then close.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
