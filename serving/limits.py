"""Load limits: admit only the work this worker can finish soon, and stop waiting for slow uploads.

Overload is answered at once instead of queued: a request whose images would take this worker past
its admission limit (images being decoded or waiting for the model) gets 503 with a JSON reason
and `Retry-After`, because a queue past capacity only adds wait (Little's law: wait = images in
flight / images per second) until every client times out. The limit is BARLOW_MAX_INFLIGHT_IMAGES,
lowered to what the measured speed clears in BARLOW_MAX_QUEUE_MS (default 1000), but never below one
full batch (BARLOW_MAX_BATCH), so light traffic and cold starts never see 503s. Images are counted
after the body is read, so a slow upload never holds a slot; while the worker is full, `Gate`
answers 503 before reading the body at all, so a flood of rejections costs the event loop little.
The batcher's BARLOW_MAX_LATENCY_MS bound sheds what slips past (503).

What bounds slow or hostile connections (BentoML 1.4.40 running uvicorn 0.54 with httptools, from
their source, checked against a running server):
- Request line and headers: at most 16 KiB of a head that is still incomplete, then 400 and close
  (serving/http_protocol.py: h11's bound, which uvicorn does not give httptools), so a trickled head
  cannot grow; a complete head arriving in one read is not capped.
  No timer runs before a request's head is complete (uvicorn arms its keep-alive timer only after a
  response), so a client trickling headers keeps its connection open indefinitely. Such a connection
  costs one file descriptor and a few KiB, no thread, task or admission slot: /embed keeps answering
  (tests/test_reliability.py holds 256 of them). The bounds are RLIMIT_NOFILE of the worker and the
  listen backlog (2048, `bentoml serve --backlog`); on an open network put a proxy with a header
  timeout in front (nginx client_header_timeout, an ingress or load balancer idle timeout).
- Idle keep-alive connections: closed after 5 s (uvicorn timeout_keep_alive, BentoML's default).
- Request body: BARLOW_BODY_TIMEOUT_S (here, default 30 s) bounds the whole body read -> 408;
  BentoML's traffic timeout (60 s, serving/service.py TIMEOUT_S) bounds a request until its response
  starts -> 504 JSON. Size: BARLOW_MAX_BODY_MB
  (Content-Length checked before reading, the stream counted without one) -> 413; multipart: at most
  BARLOW_MAX_IMAGES + 1 files, 8 fields, 1 MiB per text field (Starlette) -> 413/400.
- Concurrency: uvicorn's limit_concurrency is not set by BentoML, and BentoML's
  traffic.max_concurrency (a 429 without Retry-After) also counts slow uploads; it stays unset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from serving import metrics
from serving.requests import RequestError

RETRY_AFTER_S = 1
SMOOTHING = 0.1  # weight of each new rate sample: about the last ten requests count


class Unavailable(RequestError):
    """503 with Retry-After: the server cannot take this request now; the same request may succeed later."""

    def __init__(self, reason: str, message: str):
        super().__init__(503, reason, message, headers={"Retry-After": str(RETRY_AFTER_S)})


class Admission:
    """Images in flight in this worker, bounded. Used from one event loop only, so no lock.

    The bound is `max_limit`, or, with a target wait, what this worker finishes in that time:
    limit = images per second x target_wait_s (Little's law), the rate measured from admitted
    requests as (images ahead of it + its own) / its time from admission to embedding, smoothed.
    So the bound follows the real speed: a GPU or an idle machine admits up to `max_limit`, a CPU
    starved by other work admits less, and an admitted request waits about the target, not more.
    It never falls below `min_limit` (the service: one full batch), because a rate measured on a cold
    start or from small batches underestimates what a full batch clears, and light traffic must not
    see 503s.
    """

    def __init__(self, max_limit: int, target_wait_s: float = 0.0, min_limit: int = 1):
        self.max_limit, self.limit, self.target_wait_s = max_limit, max_limit, target_wait_s
        self.min_limit = max(1, min(min_limit, max_limit))
        self.in_flight, self.rate = 0, 0.0
        metrics.ADMISSION_LIMIT.set(self.limit)

    def full(self) -> bool:
        """No request can be admitted now (not even one image)."""
        return self.in_flight >= self.limit

    def at_capacity(self) -> Unavailable:
        return Unavailable("in_flight_limit", f"the server is at capacity ({self.in_flight} images in flight, "
                           f"limit {self.limit}); retry after {RETRY_AFTER_S} s")

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Hold `images` slots for the block, or raise Unavailable at once. A request bigger than the
        limit is admitted when nothing else is in flight, so every valid request can succeed."""
        if self.in_flight and self.in_flight + images > self.limit:
            raise self.at_capacity()
        ahead, start = self.in_flight, time.perf_counter()
        self.in_flight += images
        metrics.IN_FLIGHT_IMAGES.inc(images)
        try:
            yield
            self.observe(ahead + images, time.perf_counter() - start)
        finally:
            self.in_flight -= images
            metrics.IN_FLIGHT_IMAGES.dec(images)

    def observe(self, images: int, seconds: float) -> None:
        """One admitted request done: `images` (its own and those ahead of it) cleared in `seconds`."""
        if not self.target_wait_s or seconds <= 0:
            return
        sample = images / seconds
        self.rate = sample if not self.rate else self.rate + SMOOTHING * (sample - self.rate)
        self.limit = max(self.min_limit, min(self.max_limit, round(self.rate * self.target_wait_s)))
        metrics.ADMISSION_LIMIT.set(self.limit)


class Gate:
    """Pure ASGI middleware in front of the API routes: times each request to `paths`
    (barlow_request_seconds) and, while this worker is full, answers 503 before the body is read.

    The body's multipart parse is most of what a rejection costs the event loop, and a loop busy
    with rejections delays everything, admitted requests included. Answering before reading is safe
    for clients: uvicorn discards the rest of the body and keeps the connection, so a client
    still sending reads its 503 instead of a reset. Slow uploads still hold no slot: the gate only
    reads `Admission.full()`; the images are counted after the parse.
    """

    def __init__(self, app, admission: Callable[[], Admission | None], paths: tuple[str, ...]):
        self.app, self.admission, self.paths = app, admission, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                metrics.REQUEST_SECONDS.labels(scope["path"], str(status[0])).observe(time.perf_counter() - start)

        admission = self.admission()
        if admission is not None and admission.full():
            metrics.SHED_REQUESTS.labels("in_flight_limit").inc()
            return await admission.at_capacity().response()(scope, receive, timed_send)
        await self.app(scope, receive, timed_send)


@asynccontextmanager
async def body_deadline(seconds: float) -> AsyncIterator[None]:
    """Raise 408 when the block (reading and parsing the request body) takes longer than `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise RequestError(408, "body_timeout", f"the request body did not arrive within {seconds:g} s",
                           headers={"Connection": "close"}) from None
