"""A Python client for the barlow-embed HTTP API (`barlow serve`): embeddings as numpy arrays, search, /model.

    from serving.client import Client

    with Client("http://localhost:3000") as client:      # the token: BARLOW_API_TOKEN unless given
        vectors = client.embed(["cat.jpg", "dog.png"])    # float32 [2, D], L2-normalised
        hits = client.search(["cat.jpg"], k=5)[0]         # [{"key", "source", "label", "score"}, ...]
        again = client.search(key=hits[0]["key"])[0]      # the neighbours of an indexed image

What it takes off the caller:
- Inputs. Paths (str or Path) and bytes are uploaded as they are, so the server decodes exactly the
  file. PIL images and numpy arrays are uploaded as lossless PNG (TIFF for modes PNG cannot hold,
  such as CMYK or float), with the image's EXIF orientation kept: the server sees the same pixels.
  Arrays are H x W (grey) or H x W x C with C = 1, 3 (RGB) or 4 (RGBA). uint8 is taken as is; a
  2-D uint16 array is a 16-bit grey image (the server scales it as it scales a 16-bit PNG); other
  integer arrays must hold 0-255. Float arrays are intensities in [0, 1], scaled by 255 and rounded;
  a float array outside [0, 1] (0-255 floats, say) is refused rather than guessed at. A 4-D array
  is N images; a single image, not in a list, is one.
- Batching. A call with more images than the server takes per request (BARLOW_MAX_IMAGES, read
  once from its /docs.json, else 64, the server's default; or `batch_size`) is sent as several
  requests, one after the other, and the answers are joined in input order. A 413 that names a
  lower limit (a server behind the same address configured otherwise) lowers it and splits again,
  as does a 413 for the body size; an image the server refuses fails the whole call, with its index
  in the caller's input, never a partial result.
- Retries. A 503 (at capacity, encoder restarting) is retried after its Retry-After (seconds or an
  HTTP date, plus up to a tenth at random so that clients refused together do not all come back
  together; without one, exponential back-off from 0.25 s), and a connection that fails or drops
  before an answer is retried the same way: every route here is a pure computation, so repeating a
  request is safe. At most `retries` retries per request, and none that would start more than
  `retry_window_s` after its first attempt; then the last answer is raised.
- Transfer. Embeddings are asked for as .npy (`Accept: application/x-npy`: 4 bytes per value instead
  of about 11 characters of JSON, and nothing to parse), with JSON accepted too: a server that does not
  offer npy answers JSON, and one that answers 406 is asked for JSON from then on.
- Auth. `Authorization: Bearer <token>` on every request (the server's BARLOW_API_TOKEN).
- Errors. Any answer the client cannot use raises `ApiError` with the status, the server's reason and
  one-sentence message, and the image's index when one image is at fault.

Only httpx and numpy are imported (Pillow only once a PIL image or an array is given): no BentoML and
no server code, so the client runs anywhere the package is installed. The benchmarks' load generators
build their request bodies with `multipart` (bench/loadgen.py).
"""

from __future__ import annotations

import email.utils
import io
import os
import random
import re
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import httpx
import numpy as np

if TYPE_CHECKING:
    import PIL.Image

JSON = "application/json"
NPY = "application/x-npy"
ACCEPT_NPY = f"{NPY}, {JSON};q=0.5"  # npy when the server has it, JSON otherwise
OCTET = "application/octet-stream"
TOKEN_ENV = "BARLOW_API_TOKEN"
DEFAULT_URL = "http://localhost:3000"
DEFAULT_MAX_IMAGES = 64  # the server's default BARLOW_MAX_IMAGES (serving/settings.py)
DEFAULT_K = 10
RETRY_STATUSES = (503,)
# Failures before any answer arrived; ReadError and RemoteProtocolError include a connection the server
# closed (a keep-alive connection it had just timed out, a restarting worker). A read timeout is not
# retried: the server is slow, and asking again would only add to its queue.
TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError)
BACKOFF_S, BACKOFF_MAX_S = 0.25, 8.0
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")  # what Pillow writes to PNG without loss
ORIENTATION = 0x0112  # the EXIF tag the server applies


class ApiError(Exception):
    """The server refused a request (4xx), or a 5xx or a failed connection outlasted the retries.

    `status` (None when no answer came), `reason` (the server's short code, when it sends one),
    `message` (its sentence), `index` (the image at fault, counted in the caller's input)."""

    def __init__(self, status: int | None, reason: str | None, message: str, index: int | None = None,
                 route: str = ""):
        self.status, self.reason, self.message, self.index, self.route = status, reason, message, index, route
        what = " ".join(str(part) for part in (status, reason) if part) or "no answer"
        super().__init__(f"{route + ': ' if route else ''}{what}: {message}")


def api_error(response: httpx.Response, route: str, offset: int = 0) -> ApiError:
    """The ApiError of an error answer: the JSON `{"error", "reason", "index"}` the server sends, or
    what any other answer (a proxy's page) has to say; image indexes moved by `offset`."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error") or body.get("message"), str):
        message, reason, index = body.get("error") or body["message"], body.get("reason"), body.get("index")
    else:
        message, reason, index = " ".join(response.text.split())[:200] or response.reason_phrase, None, None
    if isinstance(index, int) and offset:  # "image 2: ..." of the third request of 64 is image 130 here
        message = re.sub(rf"^image {index}\b", f"image {index + offset}", message)
        index += offset
    return ApiError(response.status_code, reason, message, index if isinstance(index, int) else None, route)


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0) if when is not None else None


# ------------------------------------------------------------------------------------------- encoding


def multipart(files: Sequence[tuple[str, bytes]], boundary: str | None = None,
              part_type: str = OCTET) -> tuple[bytes, str]:
    """One multipart/form-data body with an `images` file part per (file name, bytes), and its
    Content-Type. Without a `boundary` a random one is drawn (again, in the unlikely case that it occurs
    in the data); a given one must not occur in it."""
    while True:
        marker = (boundary or secrets.token_hex(16)).encode("ascii")
        if not any(b"--" + marker in data for _, data in files):
            break
        if boundary:
            raise ValueError(f"the multipart boundary {boundary!r} occurs in an image")
    parts = [b"--%s\r\nContent-Disposition: form-data; name=\"images\"; filename=\"%s\"\r\nContent-Type: %s\r\n\r\n"
             % (marker, safe_filename(name).encode("ascii"), part_type.encode("ascii")) + data + b"\r\n"
             for name, data in files]
    return b"".join(parts) + b"--%s--\r\n" % marker, f"multipart/form-data; boundary={marker.decode()}"


def safe_filename(name: str) -> str:
    """The name as is when it is plain printable ASCII without quotes; the server only logs it."""
    ok = name.isascii() and name.isprintable() and not any(c in name for c in '"\\')
    return name if ok and name else "image"


def as_images(images: Any) -> Iterable:
    """The caller's input as an iterable of single images: one image alone, a 4-D array's rows, or the items."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or is_pil(images):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return images


def is_pil(image: Any) -> bool:
    pil = sys.modules.get("PIL.Image")  # a PIL image exists only once Pillow was imported
    return pil is not None and isinstance(image, pil.Image)


def encode_image(image: Any, number: int = 0) -> tuple[str, bytes]:
    """(file name, bytes) to upload for one image: a file's or given bytes as they are, a PIL image or
    a numpy array as a lossless image file."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image-{number}", bytes(image)
    if isinstance(image, np.ndarray):
        return f"array-{number}.png", pil_bytes(array_image(image))
    if is_pil(image):
        return f"image-{number}.png", pil_bytes(image)
    raise TypeError(f"cannot send a {type(image).__name__} as an image: give a path, bytes, a PIL image or a numpy "
                    "array (H x W or H x W x 1/3/4)")


def array_image(array: np.ndarray) -> PIL.Image.Image:
    """A numpy image array -> a PIL image of the same pixels (see the module docstring for what is taken)."""
    from PIL import Image as PILImage

    pixels = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)) or 0 in pixels.shape:
        hint = " (channels first? pass array.transpose(1, 2, 0))" if array.ndim == 3 and array.shape[0] in (1, 3, 4) \
            else ""
        raise ValueError(f"an image array is H x W or H x W x C with C = 1, 3 or 4, not {list(array.shape)}{hint}")
    if pixels.dtype == np.uint16 and pixels.ndim == 2:
        return PILImage.fromarray(np.ascontiguousarray(pixels))  # I;16, scaled to 8 bits by the server
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all():
            raise ValueError("a float image array holds NaN or infinite values")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > 1:
            raise ValueError(f"float image arrays are intensities in [0, 1]; this one spans [{low:g}, {high:g}] "
                             "(for 0-255 values pass array.astype(np.uint8))")
        pixels = np.rint(pixels.astype(np.float64) * 255).astype(np.uint8)
    elif pixels.dtype.kind in "iu" and pixels.dtype != np.uint8:
        if pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(f"a {pixels.dtype} image array must hold 0-255 (a 2-D uint16 array is a 16-bit grey "
                             f"image), not [{pixels.min()}, {pixels.max()}]")
        pixels = pixels.astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise ValueError(f"image arrays are uint8, other integers in 0-255, or floats in [0, 1], not {pixels.dtype}")
    return PILImage.fromarray(np.ascontiguousarray(pixels))


def pil_bytes(image: PIL.Image.Image) -> bytes:
    """A PIL image as PNG (fast, lossless; TIFF for modes PNG cannot hold), keeping its EXIF orientation."""
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    orientation = image.getexif().get(ORIENTATION)
    if orientation and orientation != 1:  # the server turns the image as the original file would be turned
        exif = type(image.getexif())()
        exif[ORIENTATION] = orientation
        options["exif"] = exif
    if image.mode in PNG_MODES:
        image.save(buffer, "PNG", compress_level=1, **options)
        return buffer.getvalue()
    try:
        image.save(buffer, "TIFF", **options)  # CMYK, I, F, YCbCr, LAB...
    except (OSError, ValueError, KeyError):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "PNG", compress_level=1, **options)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- responses


def read_embeddings(response: httpx.Response, count: int, route: str) -> list[np.ndarray]:
    """The float32 [count, D] array of an /embed answer (npy, JSON floats or base64 JSON), as a list of one."""
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if media_type == NPY:
            array = np.load(io.BytesIO(response.content), allow_pickle=False)
        else:
            body = response.json()
            if "embeddings_base64" in body:
                import base64

                dtype = {"float32": "<f4", "float16": "<f2"}[body["dtype"]]
                array = np.frombuffer(base64.b64decode(body["embeddings_base64"]), dtype).reshape(body["shape"])
            else:
                array = np.asarray(body["embeddings"], dtype=np.float32)
        array = np.asarray(array, dtype=np.float32)
    except (ValueError, KeyError, TypeError, EOFError) as exc:
        raise ApiError(response.status_code, "bad_response", f"the answer is not an embedding array ({exc})",
                       route=route) from None
    if array.ndim != 2 or array.shape[0] != count:
        raise ApiError(response.status_code, "bad_response", f"asked for {count} embeddings, the answer has shape "
                       f"{list(array.shape)}", route=route)
    return [array]


def read_neighbours(response: httpx.Response, count: int, route: str) -> list[list[dict[str, Any]]]:
    """The neighbour lists of a /search answer, one per query, checked to be `count`."""
    try:
        results = [result["neighbours"] for result in response.json()["results"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ApiError(response.status_code, "bad_response", f"the answer is not a search result ({exc})",
                       route=route) from None
    if len(results) != count:
        raise ApiError(response.status_code, "bad_response", f"asked about {count} images, the answer has "
                       f"{len(results)} results", route=route)
    return results


def limit_from(error: ApiError) -> int | None:
    """The per-request image limit a 413 names ("more than the limit of 32", "more than 32 images")."""
    match = re.search(r"limit of (\d+)|more than (\d+) images", error.message)
    return int(match.group(1) or match.group(2)) if match and error.status == 413 else None


# ------------------------------------------------------------------------------------------- client


class Client:
    """A connection pool to one server; thread-safe, close it (or use `with`) when done.

    url: the server (default http://localhost:3000). token: the bearer token; None reads
    BARLOW_API_TOKEN from the environment, "" sends none. timeout: seconds for each request (the server
    itself gives up after 60). batch_size: images per request; None: the server's own limit. retries,
    retry_window_s: how many retries of a 503 or a failed connection, and for how long after a
    request's first attempt one may start. npy: ask for .npy embeddings (JSON when False). Other keyword
    arguments go to httpx.Client (e.g. verify, proxy, event_hooks); `http` is that client.
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 60.0,
                 batch_size: int | None = None, retries: int = 5, retry_window_s: float = 60.0, npy: bool = True,
                 **http_options: Any):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        token = os.environ.get(TOKEN_ENV, "") if token is None else token
        headers = {"Authorization": f"Bearer {token.strip()}"} if token and token.strip() else {}
        headers.update(http_options.pop("headers", None) or {})
        self.url, self.batch_size, self.npy = url.rstrip("/"), batch_size, npy
        self.retries, self.retry_window_s = retries, retry_window_s
        self.server_limit: int | None = None  # BARLOW_MAX_IMAGES as the server stated it
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, **http_options)
        self._info: dict[str, Any] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # ------------------------------------------------------------------------------------------ API

    def model(self) -> dict[str, Any]:
        """GET /model: the served model's model.json plus `runtime` (provider, device, precision)."""
        response = self.request("GET", "/model")
        if response.status_code >= 400:
            raise api_error(response, "GET /model")
        self._info = response.json()
        return self._info

    def embed(self, images: Any, normalize: bool = True) -> np.ndarray:
        """Embeddings of `images` (paths, bytes, PIL images, numpy arrays; a list, or one image) as float32
        [N, D] in input order, L2-normalised unless normalize=False (the backbone's raw features)."""
        params = {"normalize": "true" if normalize else "false"}
        arrays = [array for offset, batch in self.batches(images)
                  for array in self.post_images("/embed", batch, params, read_embeddings, offset)]
        if not arrays:
            dim = int((self._info or self.model())["dim"])
            return np.zeros((0, dim), dtype=np.float32)
        return np.concatenate(arrays)

    def search(self, images: Any = None, key: str | None = None, k: int = DEFAULT_K) -> list[list[dict[str, Any]]]:
        """The k nearest indexed images of each of `images`, or of the indexed image `key` (give one of
        them): one list per query, best first, of {"key", "source", "label", "score"} (cosine similarity).
        A server without an index answers 404 (ApiError)."""
        if (images is None) == (key is None):
            raise ValueError("search(images=...) or search(key=...): give one of them")
        if key is not None:
            response = self.request("POST", "/search", params={"key": str(key), "k": str(k)})
            if response.status_code >= 400:
                raise api_error(response, "POST /search")
            return read_neighbours(response, 1, "POST /search")
        return [hits for offset, batch in self.batches(images)
                for hits in self.post_images("/search", batch, {"k": str(k)}, read_neighbours, offset)]

    # ---------------------------------------------------------------------------------------- parts

    def images_per_request(self) -> int:
        """batch_size, else the server's BARLOW_MAX_IMAGES (from its /docs.json, asked once), lowered by
        any 413 that named a lower one."""
        if self.server_limit is None and self.batch_size is None:
            self.server_limit = self.read_limit() or DEFAULT_MAX_IMAGES
        return min(self.batch_size or self.server_limit, self.server_limit or self.batch_size)

    def read_limit(self) -> int | None:
        """The `images` limit /docs.json states for /embed ("at most N (more: 413)"), None if it says none."""
        try:
            response = self.http.get("/docs.json")
            schema = response.json()["paths"]["/embed"]["post"]["requestBody"]["content"]["multipart/form-data"]
            match = re.search(r"at most (\d+)", schema["schema"]["properties"]["images"]["description"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return int(match.group(1)) if match else None

    def batches(self, images: Any) -> Iterator[tuple[int, list]]:
        """(offset, images) per request, read lazily from the input; the limit is asked for only when a
        call has more than one image."""
        items = iter(as_images(images))
        batch, offset = list(islice(items, 2)), 0
        if len(batch) < 2:
            if batch:
                yield 0, batch
            return
        while batch:
            size = self.images_per_request()
            batch += islice(items, max(size - len(batch), 0))
            yield offset, batch[:size]
            offset += len(batch[:size])
            batch = batch[size:] or list(islice(items, 1))

    def post_images(self, path: str, batch: list, params: dict[str, str],
                    read: Callable[[httpx.Response, int, str], list], offset: int) -> list:
        """POST one batch (encoded once, whatever the retries and splits); `read` turns the answer into
        one value per image (or one array); a 413 about the request's size splits it."""
        return self.post_files(path, [encode_image(image, offset + i) for i, image in enumerate(batch)], params, read,
                               offset)

    def post_files(self, path: str, files: list[tuple[str, bytes]], params: dict[str, str],
                   read: Callable[[httpx.Response, int, str], list], offset: int) -> list:
        route = f"POST {path}"
        body, content_type = multipart(files)
        headers = {"Content-Type": content_type}
        if path == "/embed":
            headers["Accept"] = ACCEPT_NPY if self.npy else JSON
        response = self.request("POST", path, params=params, content=body, headers=headers)
        if response.status_code == 406 and self.npy and path == "/embed":
            self.npy = False  # a server (or proxy) that will not negotiate npy: JSON from now on
            return self.post_files(path, files, params, read, offset)
        if response.status_code < 400:
            return read(response, len(files), route)
        error = api_error(response, route, offset)
        pieces = self.split(error, len(files))
        if pieces is None:
            raise error
        return [value for start in range(0, len(files), pieces)
                for value in self.post_files(path, files[start:start + pieces], params, read, offset + start)]

    def split(self, error: ApiError, count: int) -> int | None:
        """Images per piece when a 413 was about the request (too many images, body too large), else None."""
        if error.status != 413 or count < 2 or error.index is not None:  # an index: one image is too large
            return None
        limit = limit_from(error)
        if limit is not None and limit < count:
            self.server_limit = limit if self.server_limit is None else min(self.server_limit, limit)
            return limit
        if error.reason == "body_too_large" or "body is larger" in error.message:
            return (count + 1) // 2
        return None

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried after a 503 (Retry-After) or a failed connection; the last answer is
        returned (the caller raises for an error status), a connection that never answered raises."""
        first, attempt = time.monotonic(), 0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except TRANSPORT_ERRORS as exc:
                wait = backoff_s(attempt)
                if attempt >= self.retries or time.monotonic() + wait - first > self.retry_window_s:
                    raise ApiError(None, "unreachable", f"{type(exc).__name__}: {exc} (after {attempt + 1} "
                                   f"attempts)", route=f"{method} {path}") from exc
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                wait = retry_after_s(response.headers.get("retry-after"))
                wait = backoff_s(attempt) if wait is None else wait * random.uniform(1.0, 1.1)
                if attempt >= self.retries or time.monotonic() + wait - first > self.retry_window_s:
                    return response
                response.close()
            attempt += 1
            time.sleep(wait)


def backoff_s(attempt: int) -> float:
    """0.25, 0.5, 1, 2 ... 8 s, each with up to a quarter more at random (clients that failed together
    do not come back together)."""
    return min(BACKOFF_S * 2 ** attempt, BACKOFF_MAX_S) * random.uniform(1.0, 1.25)
