"""Load limits: admit only the work this worker can finish soon, and stop waiting for slow uploads.

Overload is answered at once instead of queued: a request whose images would take this worker past
BARLOW_MAX_INFLIGHT_IMAGES images in flight (being decoded or waiting for the encoder) gets 503
with a JSON reason and `Retry-After`, because a queue past capacity only adds wait (Little's law:
wait = images in flight / images per second) until every client times out. Admission happens after
the body is read, so a slow upload never holds a slot and a rejected client reads its 503 instead of
a reset while still sending. The batcher's BARLOW_MAX_LATENCY_MS bound sheds what slips past (503).

What bounds slow or hostile connections (BentoML 1.4.40 running uvicorn 0.54 with h11, from their
source, checked against a running server):
- Request line and headers: h11 buffers at most 16 KiB of a head that is still incomplete, then
  400 and close (so a trickled head cannot grow; a complete head arriving in one read is not capped).
  No timer runs before a request's head is complete (uvicorn arms its keep-alive timer only after a
  response), so a client trickling headers keeps its connection open indefinitely. Such a connection
  costs one file descriptor and a few KiB, no thread, task or admission slot: /embed keeps answering
  (tests/test_reliability.py holds 256 of them). The bounds are RLIMIT_NOFILE of the worker and the
  listen backlog (2048, `bentoml serve --backlog`); on an open network put a proxy with a header
  timeout in front (nginx client_header_timeout, an ingress or load balancer idle timeout).
- Idle keep-alive connections: closed after 5 s (uvicorn timeout_keep_alive, BentoML's default).
- Request body: BARLOW_BODY_TIMEOUT_S (here, default 30 s) bounds the whole body read -> 408;
  BentoML's traffic timeout (60 s, serving/service.py TIMEOUT_S) bounds a request until its response
  starts -> 504 JSON, and was the only bound on a trickled body before. Size: BARLOW_MAX_BODY_MB
  (Content-Length checked before reading, the stream counted without one) -> 413; multipart: at most
  BARLOW_MAX_IMAGES + 1 files, 8 fields, 1 MiB per text field (Starlette) -> 413/400.
- Concurrency: uvicorn's limit_concurrency is not set by BentoML, and BentoML's
  traffic.max_concurrency (a 429 without Retry-After) also counts slow uploads; it stays unset.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from serving import metrics
from serving.requests import RequestError

RETRY_AFTER_S = 1


class Unavailable(RequestError):
    """503 with Retry-After: the server cannot take this request now; the same request may succeed later."""

    def __init__(self, reason: str, message: str):
        super().__init__(503, reason, message, headers={"Retry-After": str(RETRY_AFTER_S)})


class Admission:
    """Images in flight in this worker, bounded. Used from one event loop only, so no lock."""

    def __init__(self, limit: int):
        self.limit, self.in_flight = limit, 0

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Hold `images` slots for the block, or raise Unavailable at once. A request bigger than the
        limit is admitted when nothing else is in flight, so every valid request can succeed."""
        if self.in_flight and self.in_flight + images > self.limit:
            raise Unavailable("in_flight_limit", f"the server is at capacity ({self.in_flight} images in flight, "
                              f"limit {self.limit}); retry after {RETRY_AFTER_S} s")
        self.in_flight += images
        metrics.IN_FLIGHT_IMAGES.inc(images)
        try:
            yield
        finally:
            self.in_flight -= images
            metrics.IN_FLIGHT_IMAGES.dec(images)


@asynccontextmanager
async def body_deadline(seconds: float) -> AsyncIterator[None]:
    """Raise 408 when the block (reading and parsing the request body) takes longer than `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise RequestError(408, "body_timeout", f"the request body did not arrive within {seconds:g} s",
                           headers={"Connection": "close"}) from None
