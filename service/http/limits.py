"""Request-head limits in front of the app: headers over 16 KiB are answered 431 at bounded memory.

uvicorn's httptools protocol puts no bound on a request head, and the parser buffers a header value whole
before handing it over: one unauthenticated request with a 64 MB Cookie cost 130 MB of RSS. This protocol
counts the bytes of each request head as they arrive, and its size as the app would see it (URL, header names
and values) once it is complete. When either exceeds ``MAX_HEAD_BYTES``, it answers ``431 {"message": ..., "code": "REQUEST_HEADER_FIELDS_TOO_LARGE"}``,
closes the connection and stops feeding the parser: at most one read (64 KiB) past the limit is ever held.
The app never sees such a request. A request that is not valid HTTP/1.1 is answered 400 ``INVALID_HTTP_REQUEST``
in the same JSON shape (uvicorn's own answer is plain text).

HTTP/1.1 answers pipelined requests in order, so a refusal waits for the answers to the requests before it on
the connection (uvicorn writes its 400 at once, ahead of them, and a client then takes it for the first request's
answer): meanwhile nothing more is read or parsed. Used by ``keyledger serve`` (cli.py) as uvicorn's ``http``
protocol.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 16 * 1024


def _answer(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


TOO_LARGE = _answer(b"431 Request Header Fields Too Large", b'{"message":"Request headers are too large (16 KiB at '
                    b'most)","code":"REQUEST_HEADER_FIELDS_TOO_LARGE"}')
INVALID = _answer(b"400 Bad Request", b'{"message":"Invalid HTTP request","code":"INVALID_HTTP_REQUEST"}')


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools wraps it in HttpParserCallbackError, uvicorn then calls
    ``send_400_response``, which answers 431 instead when the head was too large."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request line and headers (not a body)
        self._received = 0  # bytes received in reads that began inside this head
        self._tail = 0  # the length of the read in which the previous message ended (this head may begin in it)
        self._chunk = 0  # the length of the read being parsed
        self._counted = 0  # the head's size as the app would see it: URL, names and values
        self._refusal: bytes | None = None  # the answer that ends this connection, once it is this one's turn

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        self._chunk = len(data)
        if self._in_head:
            self._received += self._chunk
        super().data_received(data)
        if self._in_head and self._refusal is None and self._received > MAX_HEAD_BYTES + len(data):
            self._refuse(TOO_LARGE)  # still no end of the head, and already past the limit: stop reading it

    def on_headers_complete(self) -> None:
        # Counted once the head is complete, not in on_url/on_header: a Python override called for every header
        # of every request was 2% of the service's CPU under revoke load. What the parser buffers meanwhile is
        # bounded by data_received (one read past the limit).
        self._in_head = False
        # The bytes received bound the head's size as the app sees it: count it only when they could exceed the
        # limit, rather than sum every header's length on every request.
        if self._received + self._tail > MAX_HEAD_BYTES:
            self._counted = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if self._counted > MAX_HEAD_BYTES:
                raise _HeadTooLarge()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._received, self._counted, self._tail = True, 0, 0, self._chunk

    def send_400_response(self, msg: str) -> None:
        self._refuse(TOO_LARGE if self._counted > MAX_HEAD_BYTES else INVALID)

    def _refuse(self, answer: bytes) -> None:
        """End the connection with ``answer``, after the answers to the requests before it (in order)."""
        self._refusal = answer
        self.flow.pause_reading()
        if self.cycle is None or (self.cycle.response_complete and not self.pipeline):
            self._send_refusal()

    def on_response_complete(self) -> None:
        if self._refusal is not None and not self.pipeline:
            self.server_state.total_requests += 1
            self._send_refusal()  # the last answer before it is out
        else:
            super().on_response_complete()  # the next pipelined request, if any, starts

    def _send_refusal(self) -> None:
        if not self.transport.is_closing():
            assert self._refusal is not None
            self.transport.write(self._refusal)
            self.transport.close()
