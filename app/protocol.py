"""uvicorn's httptools protocol, with the read limits it lacks.

uvicorn bounds neither how long a client may take to send its request headers nor how large
they may grow (its httptools parser concatenates a header value as it arrives): a connection
that sends nothing, half its headers, or an endless header holds a socket and memory for as
long as the client likes, and a few thousand of them exhaust the server's file descriptors.

Here, whenever the connection waits for a request (on connecting, and once the previous
answer is out and its request fully read), the next request's headers must arrive within
`read_timeout_s`, and may take at most `MAX_HEAD_BYTES`: past either, the client is answered
408 or 431 (JSON, as every error of this service) and disconnected; a connection that sent
nothing of a new request is closed silently (browsers keep spare ones; between requests,
uvicorn's keep-alive timeout does it). No clock runs while a request is being answered. A
body the app stops reading is the app's to time out (`main.ReadTimeout`); the rest of a body
the app answered without reading may pause no longer than the same timeout, and must be in
within `DRAIN_S` (or the timeout, if longer), or the connection is closed.
"""

from __future__ import annotations

import asyncio
import functools
import http
import json
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings

log = logging.getLogger("app.protocol")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; browsers send a few KB at most
LINGER_S = 2.0  # after a refusal, how long what the client still sends is read and dropped
DRAIN_S = 30.0  # at most, for the rest of a body the app answered without reading (nginx's)


def guarded_protocol(read_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's `http=` option, with this read timeout."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "read_timeout_s": read_timeout_s,
    })  # fmt: skip


class _HeadTooLarge(Exception):
    """Raised from the parser's callback; httptools wraps it, uvicorn answers 400 (we: 431)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    read_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._reading_head = False  # the parser is in a request's line and headers
        self._head_bytes = 0  # bytes received while it was (whole reads)
        self._message_done = True  # the last request's body is fully read
        self._draining = False  # reading the rest of a body the app answered without it
        self._drain_started = 0.0
        self._refused = False
        self._too_large = False
        self._expect_head()

    # ---- clocks -------------------------------------------------------------------------------

    def _start_clock(self, expired: Callable[[], None]) -> None:
        self._stop_clock()
        self._timer = self.loop.call_later(self.read_timeout_s, expired)

    def _stop_clock(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expect_head(self) -> None:
        """Nothing in flight: the next request's head must come in time."""
        self._reading_head, self._head_bytes = True, 0
        self._start_clock(self._head_too_slow)

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or not self._reading_head or self._answering():
            return
        if self._head_bytes == 0 and self._message_done:  # idle
            if self.timeout_keep_alive_task is None:  # uvicorn's keep-alive clock is not on
                self.transport.close()  # a spare connection that never spoke, or after a body
            return
        self._refuse(
            408,
            "request_timeout",
            f"the request headers did not arrive within {self.read_timeout_s:g} s "
            "(APP_READ_TIMEOUT_S); send the request again",
        )

    def _rest_of_body_too_slow(self) -> None:
        self._timer = None
        self._draining = False
        if not self.transport.is_closing():
            self.transport.close()  # its answer is out; the unread rest stopped coming

    # ---- transport and parser events ----------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client still sends after its answer: read and dropped
        if self._draining:  # the rest of an answered body, still coming
            if self.loop.time() - self._drain_started > max(DRAIN_S, self.read_timeout_s):
                self._rest_of_body_too_slow()  # trickled: it could go on for hours
                return
            self._start_clock(self._rest_of_body_too_slow)  # the pause restarts
        if self._reading_head:
            # Read by read, before parsing: the parser would buffer an endless header whole.
            # (A head that arrives in one read is measured exactly in on_headers_complete.)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_too_large()
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_done = False
        if not self._reading_head:  # pipelined behind a request in flight: no clock yet
            self._reading_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        head = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if head > MAX_HEAD_BYTES:
            self._too_large = True
            raise _HeadTooLarge
        self._reading_head = False
        self._stop_clock()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_done, self._draining = True, False
        if self.cycle is not None and self.cycle.response_complete and not self._reading_head:
            self._expect_head()  # answered early, and now its body is in too

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._answering():
            return  # closing, or a pipelined request (its head complete) is now answered
        if self._reading_head:
            if self._timer is None:  # a pipelined head, partly in: its clock starts now
                self._start_clock(self._head_too_slow)
        elif not self._message_done:
            self._draining, self._drain_started = True, self.loop.time()
            self._start_clock(self._rest_of_body_too_slow)
        else:
            self._expect_head()

    # ---- refusals -----------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes it cannot parse as HTTP (it logs them), in JSON like every
        other error; or to a head found too large once parsed."""
        if self._too_large:
            self._refuse_too_large()
            return
        self._refuse(400, "bad_request", f"{msg.rstrip('.')}: not a valid HTTP/1.1 request", False)

    def _refuse_too_large(self) -> None:
        self._refuse(
            431,
            "headers_too_large",
            f"the request line and headers are over {MAX_HEAD_BYTES:,} bytes",
        )

    def _refuse(self, status: int, code: str, detail: str, log_it: bool = True) -> None:
        if log_it:
            log.warning("%s from %s: %s", status, self.client, detail)
        self._stop_clock()
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


@functools.cache
def _read_timeout_from_env() -> float:
    return Settings().read_timeout_s


class GuardedFromEnv(GuardedHttpToolsProtocol):
    """The guarded protocol by class path, with the read timeout of APP_READ_TIMEOUT_S:
    `uvicorn --factory app.main:app_from_env --http app.protocol:GuardedFromEnv` (uvicorn's
    `--http` takes a class path since 0.36), and uvicorn's own `--workers` supervisor, which
    pickles its options for each process and so cannot take a class made by `guarded_protocol`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.read_timeout_s = _read_timeout_from_env()
        super().connection_made(transport)
