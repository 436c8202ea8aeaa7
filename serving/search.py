"""POST /search: the nearest indexed images of each uploaded image (when BARLOW_INDEX_DIR is set).

Multipart like /embed: one `images` file part per query image, plus an optional `k` (form field or
query parameter; default 10, at most 1000). The same auth and bad-input rules as /embed apply (the
helpers are `serving.requests`'), and a service started without an index answers 404 with how to
configure one. The index is opened at start-up and must come from the served model (same ONNX
sha256), so a mismatched pair never starts. Queries go through the same admission bound, body
deadline and batched model as /embed (serving/limits.py); faiss runs in a worker thread so the event loop keeps serving.

Response: `{"model": name, "k": k, "results": [{"neighbours": [{key, source, label, score}, ...]}, ...]}`,
one result per image in request order, neighbours best first (score: cosine similarity).

`POST /search?key=KEY&k=K` with no body searches by an indexed item instead (its stored vector; the
item itself left out): the same response with one result, 404 for a key not in the index. This is
how the search page follows a click on a result; it needs no model call.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.embed.search import DEFAULT_K, MAX_K, SearchIndex
from pipeline.errors import UserError
from pipeline.runtime import l2_normalize
from serving.requests import RequestError, read_image_parts

logger = logging.getLogger(__name__)

SEARCH_QUERIES = Counter("barlow_search_queries", "Images searched for in the index")
SEARCH_SECONDS = Histogram("barlow_search_seconds", "faiss time for the images of one /search request",
                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


def open_index(index_dir: Path | None, model_info: dict[str, Any]) -> SearchIndex | None:
    """The configured INDEX_DIR, checked against the served model; None when none is configured.

    Raises UserError (the service does not start) when the index is missing, broken or from another model.
    """
    if index_dir is None:
        return None
    index = SearchIndex(index_dir)
    index.check_model(model_info)
    logger.info("search index %s: %d %s vectors (dim %d)", index_dir, len(index), index.info.get("kind"), index.dim)
    return index


def require_index(index: SearchIndex | None) -> SearchIndex:
    if index is None:
        raise RequestError(404, "no_index", "no search index is configured on this server; start it with "
                           "BARLOW_INDEX_DIR=INDEX_DIR (barlow serve MODEL_DIR --index INDEX_DIR)")
    return index


def parse_k(value: object) -> int:
    text = str(value).strip()
    if not text.lstrip("-").isdigit() or not 1 <= int(text) <= MAX_K:
        raise RequestError(422, "bad_field", f"k must be an integer from 1 to {MAX_K}, not {text[:40]!r}")
    return int(text)


async def parse_search(request: Request, max_images: int) -> tuple[list[bytes], int]:
    """/search: `images` file parts (one per query image) and an optional `k` field or query parameter."""
    images, k = await read_image_parts(request, max_images, "k", DEFAULT_K, "curl -F images=@photo.jpg -F k=10)")
    return images, parse_k(k)


def search_payload(index: SearchIndex, embeddings: np.ndarray, k: int, model_name: str) -> dict[str, Any]:
    """Neighbours of each (not yet L2-normalised) embedding, as the JSON body of a 200."""
    start = time.perf_counter()
    results = index.search(l2_normalize(embeddings), k)
    SEARCH_SECONDS.observe(time.perf_counter() - start)
    SEARCH_QUERIES.inc(len(results))
    return {"model": model_name, "k": k, "results": [{"neighbours": hits} for hits in results]}


def key_payload(index: SearchIndex, key: str, k: int, model_name: str) -> dict[str, Any]:
    """The neighbours of an indexed key, as the JSON body of a 200; 404 for a key not in the index."""
    start = time.perf_counter()
    try:
        hits = index.neighbours_of_key(key, k)
    except UserError:
        raise RequestError(404, "unknown_key", f"key {key!r} is not in the index") from None
    SEARCH_SECONDS.observe(time.perf_counter() - start)
    SEARCH_QUERIES.inc()
    return {"model": model_name, "k": k, "results": [{"neighbours": hits}]}


def key_query(request: Request) -> tuple[str, int]:
    """`?key=KEY&k=K` of a search by key; a body beside it would be ignored, so it is refused."""
    if request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers:
        raise RequestError(422, "bad_field", "search by ?key= takes no body; send images or a key, not both")
    key = request.query_params["key"]
    if not key:
        raise RequestError(422, "bad_field", "key must not be empty")
    return key, parse_k(request.query_params.get("k", DEFAULT_K))


async def search(request: Request) -> JSONResponse:
    """The route: auth, index, parse, decode, batched model, faiss (thread); or a key's stored vector."""
    import anyio
    import bentoml

    from serving.limits import body_deadline

    service = bentoml.get_current_service()
    try:
        service.authorize(request)
        index = require_index(service.search_index)
        if "key" in request.query_params:
            key, k = key_query(request)
            return JSONResponse(await anyio.to_thread.run_sync(key_payload, index, key, k, service.name))
        async with body_deadline(service.settings.body_timeout_s):
            images, k = await parse_search(request, service.settings.max_images)
        with service.admission.admit(len(images)):  # the same per-worker bound as /embed: 503 when full
            embeddings = await service.encode(await service.decode(images))  # decoded as /embed decodes
    except RequestError as exc:
        return service.reject(exc)
    return JSONResponse(await anyio.to_thread.run_sync(search_payload, index, embeddings, k, service.name))
