"""Embeddings -> response bytes in the format a client asked for; pure functions, no server needed.

/embed and /embed_base64 answer JSON floats by default. Two denser forms, for clients that move many
vectors, carry exactly the same numbers:

- `Accept: application/x-npy`: the float32 array [N, D] as a .npy file (`numpy.save`, little-endian),
  `numpy.load(io.BytesIO(body))` reads it.
- `?encoding=base64` (JSON): `{"model", "dim", "dtype", "shape", "embeddings_base64"}`, the array's
  little-endian bytes in row-major order, base64-encoded.

`?dtype=float16` halves either (float16 keeps about 3 decimal digits; float32 is the default). The
choice is the query parameter, not a media-type parameter: `Accept: application/x-npy; dtype=...` is
answered 406 with a pointer to `?dtype=`. JSON floats are always float32 values, so `dtype=float16`
without a binary form is a 422, as is `encoding=base64` with the npy type. Every embedding response
carries X-Barlow-Model and X-Barlow-Dim, and Vary: Accept.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import orjson

from serving.requests import RequestError

JSON = "application/json"
NPY = "application/x-npy"
ENCODINGS = ("floats", "base64")  # ?encoding=, JSON responses
DTYPES = {"float32": "<f4", "float16": "<f2"}  # ?dtype=, npy and base64; little-endian on every host
SPECIFICITY = {"*/*": 0, "application/*": 1}  # an exact media type: 2


@dataclass(frozen=True)
class ResponseFormat:
    media_type: str = JSON  # JSON or NPY
    encoding: str = "floats"  # JSON only: floats | base64
    dtype: str = "float32"  # NPY and base64: float32 | float16

    @property
    def binary(self) -> bool:
        return self.media_type == NPY or self.encoding == "base64"


def accepted_ranges(accept: str) -> list[tuple[str, dict[str, str], float]]:
    """`Accept` -> (media range, parameters other than q, q) in header order; 400 when malformed."""
    ranges = []
    for item in accept.split(","):
        media, *params = [part.strip() for part in item.split(";")]
        if not media:
            continue
        if "/" not in media:
            raise RequestError(400, "bad_accept", f"the Accept header has {media[:40]!r}, which is not a media type")
        parameters, q = {}, 1.0
        for param in params:
            key, _, value = param.partition("=")
            key, value = key.strip().lower(), value.strip().strip('"')
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = -1.0
                if not 0 <= q <= 1:
                    raise RequestError(400, "bad_accept", f"the Accept header has q={value[:20]!r}; q is 0 to 1")
            elif key:
                parameters[key] = value.lower()
        ranges.append((media.lower(), parameters, q))
    return ranges


def media_quality(media_type: str, ranges: list[tuple[str, dict[str, str], float]]) -> tuple[float, int]:
    """(q, specificity) of our `media_type` under the most specific range that covers it; (0, -1): none.

    A range with parameters we do not produce (anything on the npy type, anything but charset=utf-8 on
    JSON) does not cover it: serving something else than was asked for is exactly what 406 is for.
    """
    best = (0.0, -1)
    for media, params, q in ranges:
        specificity = SPECIFICITY.get(media, 2 if media == media_type else -1)
        if specificity < 0:  # both our types are application/*, so every wildcard covers them
            continue
        allowed = {"charset": "utf-8"} if media_type == JSON else {}
        if specificity == 2 and any(allowed.get(key) != value for key, value in params.items()):
            continue
        if specificity > best[1]:
            best = (q, specificity)
    return best


def negotiate(accept: str, query: Mapping[str, str]) -> ResponseFormat:
    """The response format from the Accept header and the `encoding` and `dtype` query parameters.

    No Accept, `*/*` or `application/json`: JSON. The highest q wins; on a tie the more specific
    range (`application/x-npy, */*` asks for npy), then JSON. Nothing we produce acceptable: 406.
    """
    encoding = query.get("encoding", "floats").strip().lower()
    dtype = query.get("dtype", "float32").strip().lower()
    if encoding not in ENCODINGS:
        raise RequestError(422, "bad_field", f"encoding must be one of {', '.join(ENCODINGS)}, not {encoding[:20]!r}")
    if dtype not in DTYPES:
        raise RequestError(422, "bad_field", f"dtype must be one of {', '.join(DTYPES)}, not {dtype[:20]!r}")
    ranges = accepted_ranges(accept) or [("*/*", {}, 1.0)]
    (json_q, json_specific), (npy_q, npy_specific) = media_quality(JSON, ranges), media_quality(NPY, ranges)
    if json_q <= 0 and npy_q <= 0:
        hint = ("; ask for float16 with ?dtype=float16, not a media-type parameter"
                if any(media == NPY and params for media, params, _ in ranges) else "")
        raise RequestError(406, "not_acceptable", f"this route answers {JSON} or {NPY}, not {accept[:80]!r}{hint}")
    media_type = NPY if (npy_q, npy_specific) > (json_q, json_specific) else JSON
    if media_type == NPY and encoding != "floats":
        raise RequestError(422, "bad_field", f"encoding={encoding} applies to JSON responses, not {NPY}")
    if media_type == JSON and encoding == "floats" and dtype != "float32":
        raise RequestError(422, "bad_field", f"dtype={dtype} needs Accept: {NPY} or encoding=base64; "
                           "JSON floats are float32 values")
    return ResponseFormat(media_type, encoding, dtype)


def as_dtype(embeddings: np.ndarray, dtype: str) -> np.ndarray:
    """C-ordered little-endian `dtype`; 422 when float16 cannot hold a value (raw features above 65504)."""
    with np.errstate(over="ignore"):  # checked just below, as a 422
        array = np.ascontiguousarray(embeddings, dtype=DTYPES[dtype])
    if dtype != "float32" and not np.isfinite(array).all() and np.isfinite(embeddings).all():
        raise RequestError(422, "float16_overflow", "an embedding value is beyond float16's range; "
                           "ask for float32 or normalize=true")
    return array


def json_floats(name: str, dim: int, embeddings: np.ndarray) -> bytes:
    """The default body: {"model", "dim", "embeddings": [[...], ...]}. Each number is the shortest decimal
    that reads back as the same float32 (orjson): about 20x faster and about half the bytes of Python's
    json module, which writes each float32 widened to float64 (0.1 as 0.10000000149011612)."""
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not np.isfinite(array).all():  # orjson would write null: a broken model must not look like data
        raise ValueError("an embedding is not finite")
    return orjson.dumps({"model": name, "dim": dim, "embeddings": array}, option=orjson.OPT_SERIALIZE_NUMPY)


def json_base64(name: str, dim: int, embeddings: np.ndarray, dtype: str = "float32") -> bytes:
    array = as_dtype(embeddings, dtype)
    body = {"model": name, "dim": dim, "dtype": dtype, "shape": list(array.shape),
            "embeddings_base64": base64.b64encode(array.tobytes()).decode()}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def npy(embeddings: np.ndarray, dtype: str = "float32") -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, as_dtype(embeddings, dtype), allow_pickle=False)
    return buffer.getvalue()


def header_value(text: str) -> str:
    """HTTP headers are Latin-1 at best: anything but printable ASCII is percent-encoded."""
    return text if text.isascii() and text.isprintable() else quote(text, safe="")


def render(fmt: ResponseFormat, name: str, dim: int, embeddings: np.ndarray) -> tuple[bytes, str, dict[str, str]]:
    """(body, media type, headers) of one embedding response."""
    headers = {"X-Barlow-Model": header_value(name), "X-Barlow-Dim": str(dim), "Vary": "Accept"}
    if fmt.media_type == NPY:
        return npy(embeddings, fmt.dtype), NPY, headers
    if fmt.encoding == "base64":
        return json_base64(name, dim, embeddings, fmt.dtype), JSON, headers
    return json_floats(name, dim, embeddings), JSON, headers


def decode_base64_body(body: Mapping) -> np.ndarray:
    """Client side of `encoding=base64` (used by tests and the benchmark): the [N, D] array back."""
    array = np.frombuffer(base64.b64decode(body["embeddings_base64"]), dtype=DTYPES[body["dtype"]])
    return array.reshape(body["shape"])
