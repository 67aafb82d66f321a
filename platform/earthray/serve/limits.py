"""What one gateway replica lets a request take: slots, memory, and time to send its body.

Every limit refuses at once rather than queueing: a queue in front of a saturated model host only
turns overload into latency. Refusals are ``RequestError``s carrying their HTTP status (and
``Retry-After`` for 503), so the gateway answers them like any other client mistake:

- ``Slots``: at most N holders (predictions in the gateway, bodies still arriving); one more is 503.
- ``Budget``: bytes the requests in flight hold together (bodies, decoded inputs), reserved before the
  memory is spent (a body's declared length before it is read); a request that would overflow it is 503,
  one larger than the whole budget is 413.
- ``read_body``: the body's declared size checked before a byte is read (413), a body of unknown size
  refused at once (411: Serve's proxy buffers whatever a client sends, in memory, as fast as it arrives,
  so an endless chunked upload would fill the proxy before any limit could stop it), the size counted
  again as it streams in, and a deadline for all of it (408).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starlette.requests import ClientDisconnect, Request

from earthray.serve.inputs import RequestError

CLOSE = {"Connection": "close"}
"""Headers of an answer given before the body was read: the connection cannot carry another request."""


class Overloaded(RequestError):
    """503: the service is full now; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float, close: bool = False):
        super().__init__(f"overloaded: {message}; retry after {math.ceil(retry_after_s)} s", 503)
        self.headers = {"Retry-After": str(math.ceil(retry_after_s))} | (CLOSE if close else {})


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Slots:
    """At most ``limit`` concurrent holders; the next one is refused with 503 at once."""

    def __init__(self, limit: int, what: str, retry_after_s: float, close: bool = False):
        self.limit, self.what, self.retry_after_s, self.close = limit, what, retry_after_s, close
        self.used = 0

    @contextmanager
    def take(self) -> Iterator[None]:
        if self.used >= self.limit:
            raise Overloaded(f"{self.used} {self.what} already (the limit is {self.limit})", self.retry_after_s,
                             self.close)
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


class Budget:
    """Bytes held by requests in flight, at most ``limit``; reservations may come from worker threads."""

    def __init__(self, limit: int, retry_after_s: float):
        self.limit, self.retry_after_s = limit, retry_after_s
        self.used = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """A ``reserve(nbytes)`` for one request; everything it reserved is released on exit."""
        held = 0

        def reserve(nbytes: int) -> None:
            nonlocal held
            if held + nbytes > self.limit:  # no wait would let it in: a client error, not overload
                raise RequestError(f"this request needs {megabytes(held + nbytes)} in flight, more than this gateway's "
                                   f"whole {megabytes(self.limit)} (max_inflight_bytes); send fewer pixels", 413)
            with self._lock:
                if self.used + nbytes > self.limit:
                    raise Overloaded(f"requests in flight hold {megabytes(self.used)} of this gateway's "
                                     f"{megabytes(self.limit)} (max_inflight_bytes); this one needs "
                                     f"{megabytes(nbytes)} more", self.retry_after_s)
                self.used += nbytes
                held += nbytes

        try:
            yield reserve
        finally:
            with self._lock:
                self.used -= held


async def read_body(request: Request, limit: int, timeout_s: float, uploads: Slots,
                    reserve: Callable[[int], None]) -> bytes:
    """The whole body, holding one of ``uploads`` while it arrives and ``reserve``-ing its declared length
    first; 411 without a Content-Length, 413 past ``limit`` bytes, 408 past ``timeout_s`` seconds, 400 when it
    is empty or the client went away."""
    length = request.headers.get("content-length")
    if length is None and "transfer-encoding" in request.headers:
        raise RequestError(f"send the body with a Content-Length header; bodies of unknown length are refused "
                           f"(the limit is {limit} bytes, max_request_bytes)", 411, headers=CLOSE)
    if length is not None and (not length.isdigit() or int(length) > limit):
        problem = f"declares {length} bytes" if length.isdigit() else f"has a bad Content-Length {length!r}"
        raise RequestError(f"the request body {problem}; the limit is {limit} bytes (max_request_bytes)",
                           413 if length.isdigit() else 400, headers=CLOSE)
    if length is not None:
        reserve(int(length))
    chunks, size = [], 0
    with uploads.take():
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(f"the request body passed the limit of {limit} bytes "
                                           "(max_request_bytes)", 413, headers=CLOSE)
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(f"the request body did not arrive within {timeout_s:g} s (body_timeout_s; "
                               f"{size} bytes came)", 408, headers=CLOSE) from None
        except ClientDisconnect:
            raise RequestError("the client disconnected before sending the whole body", 400) from None
    if not size:
        raise RequestError("empty request body: send a GeoTIFF, a .npy array or JSON", 400)
    return b"".join(chunks)


async def read_form(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
    """The ``file`` part and the ``bands``/``nodata`` fields of a multipart body already read."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        message = {"type": "http.request", "body": b"" if sent else body, "more_body": False}
        sent = True
        return message

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as e:  # the parser's own errors: the body is not valid multipart
        raise RequestError(f"malformed multipart body ({type(e).__name__})", 400) from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise RequestError("multipart request needs a 'file' part holding a GeoTIFF or .npy", 422)
    fields = {k: v for k in ("bands", "nodata") if isinstance(v := form.get(k), str) and v}
    return await upload.read(), fields
