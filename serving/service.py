"""The /embed API: `bentoml serve serving.service:Embedder` (configured by BARLOW_* variables).

`Embedder` (public) owns the HTTP surface: auth, parsing and image decoding happen in its request
handlers, so only valid arrays go further. The encoder (serving/encoder.py) runs where BARLOW_ENCODER
says: in each Embedder worker (the CPU default: single-threaded sessions side by side, each fed by its
own thread, serving/microbatch.py's ThreadBatcher), or in `BatchedModel` (the GPU default: its own
process on a private unix socket, behind `batchable` APIs that merge the calls of all workers into
adaptive batches; each worker first merges its own concurrent requests into one call, MicroBatcher).
Either way one client's bad image never fails a batch it shares with others. BARLOW_DECODE=encoder
(auto: on CUDA/TensorRT) moves JPEG decoding into the encoder (pipeline/data/device_decode.py, nvJPEG on
a GPU): the workers still check every header, so a bad image is refused before anything is queued, and
send JPEG bytes instead of arrays; a JPEG that only the decoder finds corrupt comes back as a per-image
error, failing its own request only. /embed and /embed_base64 are plain Starlette routes mounted on the
service, because BentoML's typed multipart inputs answer some malformed bodies with 500 (and fetch URLs
given in file fields); /readyz, /livez, /metrics are BentoML's own, and /docs.json is BentoML's OpenAPI
document with these routes added (serving/openapi.py). Overload, slow uploads and a restarting model
process get 503/408 JSON answers at once (serving/limits.py says what bounds what). Responses are JSON
floats, or .npy / base64 on request (serving/responses.py). An encoder that cannot start (e.g.
BARLOW_DEVICE=cuda and no working CUDA provider) stops the whole server with a non-zero exit instead of
being restarted forever (serving/startup.py); /model and the barlow_encoder_info metric say which
provider, device and precision actually run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import anyio
import bentoml
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.data.device_decode import device_decodable, sample_jpeg
from pipeline.errors import UserError
from pipeline.runtime import l2_normalize, load_model_info, usable_cpus
from serving import http_protocol, metrics
from serving.drain import IdleDrain
from serving.encoder import Encoder, decode_place
from serving.limits import Admission, Gate, Unavailable, body_deadline
from serving.openapi import openapi_document
from serving.microbatch import MicroBatcher, ThreadBatcher
from serving.requests import (EmbedRequest, RequestError, check_body_size, check_headers, check_token, encoder_items,
                              header_pixels, parse_base64_json, parse_multipart, preprocess_all, read_body)
from serving.responses import ResponseFormat, negotiate, render
from serving.page import asset, page
from serving.search import open_index, search
from serving.settings import settings_from_env
from serving.startup import install_supervisor_hook, stop_server
from serving.thumbnails import ThumbnailCache, thumbnail_route

logger = logging.getLogger(__name__)
for _name in ("serving", "pipeline"):  # BentoML's server logging config sets the root to WARNING
    logging.getLogger(_name).setLevel(logging.INFO)

http_protocol.install()  # httptools, with h11's bound on an unfinished request head
SETTINGS = settings_from_env()  # read at import: the decorators below need the batch and worker counts
ENCODER_PLACE = SETTINGS.encoder_place()  # worker: no BatchedModel process (serving/encoder.py)
TIMEOUT_S = 60
# BentoML 1.4.40 replaces its client session to a dependency every 100 requests or 300 s and closes
# the old one with requests still in flight on it (503s under load); on a private socket there is
# nothing to gain from the refresh, so it effectively never happens.
NEVER_REFRESH = {"max_requests": 2**31 - 1, "max_age": 1e9}
# /readyz asks the model process itself, with this bound: BentoML's own dependency probe waited 30 s and
# more on a model process that had just been killed, and a probe that hangs is worse than a 503.
READY_TIMEOUT_S = 2
NO_RUNNER_PROBE = {"enabled": False, "timeout": READY_TIMEOUT_S, "period": 10}
# The Embedder's warm-up call goes to an encoder that warmed itself up already, so it is quick; the bound
# is for a socket that accepts with no process behind it (a failed encoder), which would hold the probe,
# and a shutdown waiting on it, for the full TIMEOUT_S.
WARM_UP_TIMEOUT_S = 15
# BentoML's OpenTelemetry middleware builds a span per request even when no trace is sampled (its default),
# about a tenth of the event loop's time per /embed request; a BentoML config that samples traces can
# name its own services.barlow-embed.tracing.excluded_urls to trace these routes too.
UNTRACED = ["/embed", "/embed_base64", "/search", "/thumbnail"]


@bentoml.service(name="barlow-batched-model", workers=1, threads=1, traffic={"timeout": TIMEOUT_S},
                 runner_connection=NEVER_REFRESH)
class BatchedModel:
    """The encoder in its own process, behind an adaptive batcher (BARLOW_ENCODER=process); called only by
    Embedder."""

    def __init__(self) -> None:
        self.encoder = open_encoder(SETTINGS)
        self.drain = IdleDrain(limit_s=TIMEOUT_S)
        self.drain.install()  # outlive SIGTERM until the Embedder's in-flight requests got their embeddings

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch, max_latency_ms=SETTINGS.max_latency_ms)
    def encode(self, images: np.ndarray) -> np.ndarray:
        with self.drain.active():
            return self.encoder.encode(images)

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch, max_latency_ms=SETTINGS.max_latency_ms)
    def encode_items(self, items: list) -> list:
        """BARLOW_DECODE=encoder: JPEG bytes or uint8 arrays (Encoder.encode_items). BentoML merges the lists
        of all workers into one batch (its pickle transport carries bytes and arrays as they are); per-item
        failures come back as values, so no image fails the batch it shares."""
        with self.drain.active():
            return self.encoder.encode_items(items)

    @bentoml.api
    def runtime(self) -> dict:
        """{provider, providers, device, requested_device, precision}: what this process runs (for /model)."""
        return self.encoder.runtime()


def encode_arrays(encoder: Encoder, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """One batch of arrays -> their embeddings, in a worker's own session (on its batcher thread)."""
    return list(encoder.encode(np.stack(arrays)))


def open_encoder(settings) -> Encoder:
    """The encoder of this process; one that cannot start (a restart cannot fix it) stops the server."""
    try:
        return Encoder(settings)
    except UserError as exc:
        stop_server(str(exc))
        raise


def response_format(request: Request) -> ResponseFormat:
    """Checked before the body is read: a 406 or 422 costs the client no upload and us no decoding."""
    return negotiate(request.headers.get("accept", ""), request.query_params)


async def embed(request: Request) -> Response:
    service: Embedder = bentoml.get_current_service()
    try:
        service.authorize(request)
        fmt = response_format(request)
        async with body_deadline(service.settings.body_timeout_s):
            parsed = await parse_multipart(request, service.settings.max_images)
        return await service.respond(parsed, fmt)
    except RequestError as exc:
        return service.reject(exc)


async def embed_base64(request: Request) -> Response:
    service: Embedder = bentoml.get_current_service()
    try:
        service.authorize(request)
        fmt = response_format(request)
        async with body_deadline(service.settings.body_timeout_s):
            body = await read_body(request, service.settings.max_body_mb * 2**20)
        return await service.respond(parse_base64_json(body, service.settings.max_images), fmt)
    except RequestError as exc:
        return service.reject(exc)


async def model(request: Request) -> JSONResponse:
    """model.json plus `runtime` (provider, device, precision of the encoder, and where it runs; null until it
    answers)."""
    service: Embedder = bentoml.get_current_service()
    runtime = await service.encoder_runtime()
    if runtime is not None:
        runtime = {**runtime, "encoder": ENCODER_PLACE, "sessions": len(service.local) or 1}
    return JSONResponse({**service.info, "runtime": runtime})


async def docs(request: Request) -> JSONResponse:
    """BentoML's /docs.json (probes) plus our routes, which BentoML cannot see in a Starlette app."""
    service: Embedder = bentoml.get_current_service()
    return JSONResponse(openapi_document(Embedder.openapi_spec.asdict(), service.settings))


def current_admission() -> Admission | None:
    """The worker's admission (None before the service is instantiated: nothing to protect yet)."""
    try:
        return bentoml.get_current_service().admission
    except bentoml.exceptions.BentoMLException:
        return None


api = Starlette(routes=[
    Route("/docs.json", docs, methods=["GET"]),  # the mounted app's routes match before BentoML's
    Route("/embed", embed, methods=["POST"]),
    Route("/embed_base64", embed_base64, methods=["POST"]),
    Route("/search", search, methods=["POST"]),
    Route("/model", model, methods=["GET"]),
    Route("/thumbnail/{key:path}", thumbnail_route, methods=["GET"]),
    Route("/", page, methods=["GET"]),  # before BentoML's own page at /, which documents only its own APIs
    Route("/page/{name}", asset, methods=["GET"]),
])


@bentoml.service(name="barlow-embed", workers=SETTINGS.http_workers(), traffic={"timeout": TIMEOUT_S},
                 runner_probe=NO_RUNNER_PROBE, logging={"access": {"enabled": bool(SETTINGS.access_log)}},
                 tracing={"excluded_urls": UNTRACED})
@bentoml.asgi_app(Gate(api, current_admission, ("/embed", "/embed_base64")), path="/")
class Embedder:
    """Public API: POST /embed, POST /embed_base64, POST /search, GET /model, GET /thumbnail/{key}, and the search
    page at /; BentoML adds /readyz /livez /metrics."""

    if ENCODER_PLACE == "process":
        model = bentoml.depends(BatchedModel)

    @bentoml.on_deployment
    def supervise() -> None:
        """In the `bentoml serve` process, before any service process starts (serving/startup.py)."""
        install_supervisor_hook()

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.info = load_model_info(self.settings.served_model_dir())
        self.name, self.dim, self.size = self.info["name"], int(self.info["dim"]), int(self.info["image_size"])
        Image.MAX_IMAGE_PIXELS = self.settings.max_pixels  # Pillow's own bomb guard agrees with ours
        self.decoders = anyio.CapacityLimiter(usable_cpus())  # decoding is CPU-bound: no more threads than CPUs
        # Concurrent requests of this worker share encoder calls (serving/microbatch.py). BARLOW_ENCODER=worker:
        # this worker's own sessions, each on a thread of its own, while the event loop goes on; else calls
        # to the BatchedModel process.
        self.local = [open_encoder(self.settings) for _ in range(self.settings.sessions_per_worker())] \
            if ENCODER_PLACE == "worker" else []
        self.runtime: dict | None = self.local[0].runtime() if self.local else None  # else fetched with the warm-up
        if not self.local:
            self.arrays = MicroBatcher(self.encode_arrays, self.settings.max_batch)
            self.items = MicroBatcher(self.encode_items, self.settings.max_batch)
        elif self.decode_place() == "encoder":
            self.items = ThreadBatcher([encoder.encode_items for encoder in self.local], self.settings.max_batch)
        else:
            self.arrays = ThreadBatcher([partial(encode_arrays, encoder) for encoder in self.local],
                                        self.settings.max_batch)
        self.admission = Admission(self.settings.inflight_limit, self.settings.max_queue_ms / 1000,
                                   min_limit=self.settings.max_batch)
        self.search_index = open_index(self.settings.index_dir, self.info)  # None: /search answers 404
        self.thumbnails = ThumbnailCache()
        self.warm = False  # BatchedModel's path warmed up (local encoders warmed themselves up)
        self.warm_lock = asyncio.Lock()
        metrics.MODEL_INFO.labels(self.name, self.info.get("onnx_sha256", ""), str(self.dim)).set(1)
        logger.info("serving %s (dim %d, %d px); max %d images and %d pixels per image, %d images in flight "
                    "(fewer to keep the wait under %d ms); auth %s", self.name, self.dim, self.size,
                    self.settings.max_images, self.settings.max_pixels, self.settings.inflight_limit,
                    self.settings.max_queue_ms, "on" if self.settings.api_token else "off")
        if self.local:
            logger.info("the encoder runs in this worker: %d sessions of %d threads, %s on %s (%s); images are "
                        "decoded in the %s", len(self.local), self.settings.session_threads(), self.runtime["provider"],
                        self.runtime["device"], self.runtime["precision"], self.decode_place())

    async def __is_ready__(self) -> bool:
        """Ready once one warm-up inference went through the whole path (socket, batcher, session),
        and then while the model process answers its own /readyz within READY_TIMEOUT_S (it may be restarting)."""
        if self.local:
            return True
        if self.warm:
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    return not hasattr(self.model, "is_ready") or await self.model.is_ready(READY_TIMEOUT_S)
            except Exception as exc:  # killed or restarting: its socket accepts, nobody answers
                logger.info("encoder not ready: %r", exc)
                return False
        if self.warm_lock.locked():  # another probe is warming up: answer now rather than queue a second try
            return False
        async with self.warm_lock:
            if not self.warm:
                try:
                    async with asyncio.timeout(WARM_UP_TIMEOUT_S):
                        await self.model.to_async.encode(np.zeros((1, 3, self.size, self.size), dtype=np.uint8))
                        self.runtime = self.runtime or await self.model.to_async.runtime()
                        if self.decode_place() == "encoder":  # the bytes path too, with a real JPEG
                            await self.model.to_async.encode_items([(sample_jpeg(), 1)])
                    self.warm = True
                    logger.info("the encoder runs %s on %s (%s); images are decoded in the %s",
                                self.runtime["provider"], self.runtime["device"], self.runtime["precision"],
                                self.decode_place())
                except Exception as exc:  # the model process is still starting
                    logger.info("encoder not ready yet: %r", exc)
        return self.warm

    def decode_place(self) -> str:
        """`worker` or `encoder` (BARLOW_DECODE); auto is `worker` until the encoder said what it runs."""
        return decode_place(self.settings.decode, (self.runtime or {}).get("provider", ""))

    async def encoder_runtime(self) -> dict | None:
        """What the encoder runs, asked once (at warm-up, or here for a worker that no probe reached)."""
        if self.runtime is None:
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    self.runtime = await self.model.to_async.runtime()
            except Exception as exc:  # not started yet, or restarting: /model says null
                logger.info("encoder runtime unknown yet: %r", exc)
        return self.runtime

    def authorize(self, request: Request) -> None:
        check_token(request, self.settings.api_token)
        check_body_size(request, self.settings.max_body_mb * 2**20)

    def reject(self, error: RequestError) -> JSONResponse:
        counter = metrics.SHED_REQUESTS if isinstance(error, Unavailable) else metrics.REJECTED_INPUTS
        counter.labels(error.reason).inc()
        logger.debug("rejected (%d %s): %s", error.status, error.reason, error.message)
        return error.response()

    async def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, S, S] -> float32 [N, D], through this worker's micro-batcher into the batched model."""
        return np.stack(await self.arrays.submit(list(images)))

    async def encode_arrays(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One micro-batch of arrays -> their embeddings (BatchedModel.encode)."""
        return list(await self.call_encoder("encode", np.stack(arrays)))

    async def encode_items(self, items: list) -> list:
        """One micro-batch of items -> per item an embedding or an error dict (BatchedModel.encode_items)."""
        return await self.call_encoder("encode_items", items)

    async def call_encoder(self, method: str, payload):
        """The batched model; one retry when a pooled connection was closed by the other side
        (its keep-alive is shorter than the client's, or it was restarted), which is safe because
        encoding is pure. Raises Unavailable (503) when the batcher sheds or the model process is gone."""
        import aiohttp

        api = getattr(self.model.to_async, method)
        try:
            try:
                return await api(payload)
            except aiohttp.ClientConnectionError as exc:
                logger.info("retrying once after a dropped encoder connection: %s", exc)
                return await api(payload)
        except (aiohttp.ClientError, OSError):
            logger.exception("the encoder is unreachable")
            raise Unavailable("encoder_unreachable", "the encoder is restarting; retry shortly") from None
        except Exception:  # BentoML's 503 when the batch cannot meet max_latency_ms
            logger.exception("encoder call failed")
            raise Unavailable("encoder_overloaded", "the encoder is overloaded; retry shortly") from None

    async def decode(self, images: list[bytes]) -> np.ndarray:
        """Validated uint8 arrays; small requests on the event loop, big ones in a decoder thread."""
        start = time.perf_counter()
        if sum(map(header_pixels, images)) <= self.settings.inline_pixels:
            arrays = preprocess_all(images, self.size, self.settings.max_pixels)
        else:
            arrays = await anyio.to_thread.run_sync(
                preprocess_all, images, self.size, self.settings.max_pixels, limiter=self.decoders)
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - start)
        return arrays

    async def embed(self, images: list[bytes]) -> np.ndarray:
        """Image bytes -> float32 [N, D]: decoded here (PIL) and encoded, or with BARLOW_DECODE=encoder
        checked here (headers; non-JPEGs decoded) and decoded in the encoder. A bad image is a RequestError
        for this request, raised before anything is queued or when the encoder reports it."""
        if self.settings.decode == "auto" and self.runtime is None:
            await self.encoder_runtime()  # a worker no readiness probe reached asks once what the encoder runs
        if self.decode_place() != "encoder":
            return await self.encode(await self.decode(images))
        start = time.perf_counter()
        headers = check_headers(images, self.settings.max_pixels)
        here = sum(h.pixels for h, data in zip(headers, images) if not device_decodable(h, data))
        if here <= self.settings.inline_pixels:
            items = encoder_items(images, headers, self.size, self.settings.max_pixels)
        else:
            items = await anyio.to_thread.run_sync(encoder_items, images, headers, self.size,
                                                   self.settings.max_pixels, limiter=self.decoders)
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - start)
        results = await self.items.submit(items)
        for index, result in enumerate(results):
            if isinstance(result, dict):  # decoded in the encoder: the header was fine, the pixels are not
                raise RequestError(result["status"], result["reason"], f"image {index}: {result['message']}", index)
        return np.stack(results)

    async def respond(self, request: EmbedRequest, fmt: ResponseFormat = ResponseFormat()) -> Response:
        with self.admission.admit(len(request.images)):  # 503 at once when this worker is full
            embeddings = await self.embed(request.images)
        if request.normalize:
            embeddings = l2_normalize(embeddings)
        body, media_type, headers = render(fmt, self.name, self.dim, embeddings)
        metrics.IMAGES_EMBEDDED.inc(len(embeddings))
        return Response(body, media_type=media_type, headers=headers)
