"""HTTP requests -> validated uint8 image arrays, or a 4xx JSON error; no server needed to test.

Everything a client controls is checked here, in the request handler, before the batched encoder
sees anything: a bad image fails only its own request, never the adaptive batch it would have
joined. Errors are `{"error": "<one sentence>", "reason": "<short code>", "index": <image index or
null>}` with 400 (bytes that are not a valid image, bad base64, malformed body), 401 (token), 413 (too
many images or pixels, body too large), 415 (content type) or 422 (well-formed but wrong fields or values);
serving/limits.py adds 408 (body too slow) and 503 with Retry-After (overload, encoder restarting).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.data.device_decode import Header, Item, device_decodable, read_header
from pipeline.data.preprocess import FORMATS, BadImage, load_array

JSON_FIELDS = ("images", "normalize")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class RequestError(Exception):
    """A client error: HTTP status, one sentence, the image index when one image is at fault."""

    def __init__(self, status: int, reason: str, message: str, index: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.index = status, reason, message, index
        self.headers = {"WWW-Authenticate": "Bearer"} if status == 401 else dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "reason": self.reason, "index": self.index}, self.status,
                            headers=self.headers)


@dataclass
class EmbedRequest:
    images: list[bytes]
    normalize: bool = True


def check_token(request: Request, token: str) -> None:
    """With a token configured, require `Authorization: Bearer <token>` (constant-time compare)."""
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError(401, "unauthorized", "missing or wrong bearer token (send Authorization: Bearer <token>)")


def check_body_size(request: Request, max_bytes: int) -> None:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise RequestError(413, "body_too_large", f"the request body is larger than {max_bytes // 2**20} MiB")


def parse_bool(value: object, field: str = "normalize") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise RequestError(422, "bad_field", f"{field} must be true or false, not {str(value)[:40]!r}")


def check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise RequestError(422, "no_images", "the request has no images; send one or more `images`")
    if count > max_images:
        raise RequestError(413, "too_many_images", f"the request has {count} images, more than the limit of {max_images}")


async def read_image_parts(request: Request, max_images: int, option: str, default: object,
                           example: str) -> tuple[list[bytes], object]:
    """The `images` file parts (one per image) and the value of one optional text field `option`
    (form field or query parameter), with every malformed-request case answered by a RequestError."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(415, "bad_content_type", "send multipart/form-data with one `images` file part per "
                           f"image ({example})")
    try:
        # One spare file slot so that max_images + 1 files is reported as our 413, not a parser error.
        form = await request.form(max_files=max_images + 1, max_fields=8)
    except Exception as exc:  # starlette raises HTTPException or MultiPartException for malformed bodies
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        if "Too many files" in str(detail):
            raise RequestError(413, "too_many_images", f"the request has more than {max_images} images") from None
        raise RequestError(400, "bad_multipart", f"the multipart body is malformed ({str(detail)[:120]})") from None
    try:
        unknown = sorted(set(form.keys()) - {"images", option})
        if unknown:
            raise RequestError(422, "bad_field", f"unknown field {unknown[0]!r}; send images as `images` file parts "
                               f"and optionally `{option}`")
        images = []
        for index, part in enumerate(form.getlist("images")):
            if not isinstance(part, UploadFile):
                raise RequestError(422, "bad_field", "`images` must be file parts (curl -F images=@photo.jpg), "
                                   "not text fields", index)
            images.append(await part.read())
        check_count(len(images), max_images)
        if option in form and option in request.query_params:
            raise RequestError(422, "bad_field", f"give {option} as a form field or a query parameter, not both")
        value = form.get(option, request.query_params.get(option, default))
        if isinstance(value, UploadFile):
            raise RequestError(422, "bad_field", f"{option} must be a text field, not a file")
        return images, value
    finally:
        await form.close()


async def parse_multipart(request: Request, max_images: int) -> EmbedRequest:
    """/embed: `images` file parts and an optional `normalize` (true/false, default true)."""
    images, normalize = await read_image_parts(request, max_images, "normalize", True,
                                               "curl -F images=@photo.jpg), or JSON to /embed_base64")
    return EmbedRequest(images, parse_bool(normalize))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing to buffer more than max_bytes even without a Content-Length."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, "body_too_large", f"the request body is larger than {max_bytes // 2**20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_base64_json(body: bytes, max_images: int) -> EmbedRequest:
    """`{"images": ["<base64>", ...], "normalize": true}`; data: URLs and URL-safe base64 accepted."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "bad_json", 'the body is not valid JSON; send {"images": ["<base64>", ...]}') from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RequestError(422, "bad_field", 'expected a JSON object {"images": ["<base64>", ...]}')
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(422, "bad_field", f"unknown field {unknown[0]!r}; allowed: images, normalize")
    check_count(len(data["images"]), max_images)
    return EmbedRequest([decode_base64(item, index) for index, item in enumerate(data["images"])],
                        parse_bool(data.get("normalize", True)))


def decode_base64(item: object, index: int) -> bytes:
    if not isinstance(item, str):
        raise RequestError(422, "bad_field", f"images[{index}] must be a base64 string", index)
    text = item.split(",", 1)[1] if item.startswith("data:") else item  # data:image/png;base64,....
    text = "".join(text.split())  # MIME-wrapped base64 has newlines
    try:
        return base64.b64decode(text, altchars=b"-_" if ("-" in text or "_" in text) else None, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "bad_base64", f"images[{index}] is not valid base64", index) from None


def header_pixels(data: bytes) -> int:
    """Pixels an image declares in its header (nothing decoded); 0 when the header is unreadable."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            return image.size[0] * image.size[1]
    except Exception:  # the real decode reports why; here it only sizes the work
        return 0


def preprocess_all(images: list[bytes], size: int, max_pixels: int) -> np.ndarray:
    """All images of one request -> uint8 [N, 3, size, size]; the first bad one fails the request."""
    arrays = []
    for index, data in enumerate(images):
        try:
            arrays.append(load_array(data, size, max_pixels))
        except BadImage as exc:
            raise RequestError(exc.status, exc.reason, f"image {index}: {exc}", index) from None
    return np.stack(arrays)


def check_headers(images: list[bytes], max_pixels: int) -> list[Header]:
    """Each image's header (format, size, EXIF orientation; no pixel decoded): a request with an image that
    is not one, or has more than `max_pixels`, gets its 4xx here, before anything is queued."""
    headers = []
    for index, data in enumerate(images):
        try:
            headers.append(read_header(data, max_pixels))
        except BadImage as exc:
            raise RequestError(exc.status, exc.reason, f"image {index}: {exc}", index) from None
    return headers


def encoder_items(images: list[bytes], headers: list[Header], size: int, max_pixels: int) -> list[Item]:
    """BARLOW_DECODE=encoder: what goes to the encoder per image: a JPEG it can decode on its device as
    (bytes, EXIF orientation), anything else decoded here by load_array (the first bad one fails the request)."""
    items: list[Item] = []
    for index, (data, header) in enumerate(zip(images, headers)):
        if device_decodable(header, data):
            items.append((data, header.orientation))
            continue
        try:
            items.append(load_array(data, size, max_pixels))
        except BadImage as exc:
            raise RequestError(exc.status, exc.reason, f"image {index}: {exc}", index) from None
    return items
