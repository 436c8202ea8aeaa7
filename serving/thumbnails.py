"""GET /thumbnail/{key}: a small JPEG of an indexed image, read from where the index says it lives.

The key is only ever looked up in the index's rows (SearchIndex.image_location), never joined to a
path, so no request can read anything but the sources the index was built from: a tar shard's member
(the shard is streamed up to that member) or an image object or file. A `pipe:` shard URL is a
command, and a thumbnail never runs one. A thumbnail is at most `size` px on its longer side
(`?size=`, SIZES), re-encoded as JPEG; an LRU cache bounded in bytes keeps them, because a results
page asks for the same few dozen again and again, and reading a member means streaming its shard.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image

from pipeline import storage
from pipeline.data.preprocess import BadImage, decode_image, to_rgb, upright
from pipeline.data.stream import CorruptCounter, CorruptSample, image_member, iter_samples
from pipeline.embed.search import SearchIndex
from pipeline.errors import UserError
from serving.requests import RequestError

DEFAULT_SIZE = 160
SIZES = range(16, 513)  # px on the longer side
CACHE_BYTES = 64 * 2**20  # ~10,000 thumbnails of 160 px
JPEG_QUALITY = 85


class ThumbnailCache:
    """(key, size) -> JPEG bytes, least recently used dropped first once the bytes exceed the bound."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.lock = threading.Lock()  # filled from decoder threads

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
            return self.items.get(key)

    def put(self, key: tuple[str, int], data: bytes) -> None:
        with self.lock:
            if key not in self.items:
                self.items[key] = data
                self.bytes += len(data)
            while self.bytes > self.max_bytes and self.items:
                self.bytes -= len(self.items.popitem(last=False)[1])


def parse_size(value: str | None) -> int:
    text = (value or str(DEFAULT_SIZE)).strip()
    if not text.isdigit() or int(text) not in SIZES:
        raise RequestError(422, "bad_field", f"size must be an integer from {SIZES.start} to {SIZES.stop - 1} "
                           f"(pixels), not {text[:40]!r}")
    return int(text)


def unavailable(key: str, why: str) -> RequestError:
    return RequestError(404, "image_unavailable", f"the image of key {key!r} cannot be read from its source: {why}")


def shard_member(shard: str, key: str) -> bytes:
    """The image bytes of the sample `key` in a tar shard (streamed up to it)."""
    if shard.startswith("pipe:"):
        raise unavailable(key, "it is in a pipe: shard, a command that thumbnails do not run")
    counter = CorruptCounter()
    for sample in iter_samples([shard], counter):
        if sample["__key__"] == key:
            try:
                return image_member(sample)[1]
            except CorruptSample as exc:
                raise unavailable(key, str(exc)) from None
    raise unavailable(key, counter.first_shard_error or f"no member {key!r} in {storage.name_of(shard)}")


def source_bytes(location: str, key: str) -> bytes:
    try:
        return storage.read_bytes(location)
    except (UserError, OSError) as exc:
        raise unavailable(key, str(exc)) from None


def render(data: bytes, size: int, max_pixels: int, key: str) -> bytes:
    """An upright RGB JPEG fitting size x size (never enlarged)."""
    try:
        image = upright(decode_image(data, max_pixels, draft_size=size))
    except BadImage as exc:
        raise unavailable(key, str(exc)) from None
    image = to_rgb(image)  # alpha on white, as the encoder saw it
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def thumbnail(index: SearchIndex, cache: ThumbnailCache, key: str, size: int, max_pixels: int) -> bytes:
    """JPEG bytes of `key`'s image; RequestError 404 for a key not in the index or an unreadable source.
    Blocking (reads and decodes): called in a thread."""
    cached = cache.get((key, size))
    if cached is not None:
        return cached
    location = index.image_location(key)
    if location is None:
        raise RequestError(404, "unknown_key", f"key {key!r} is not in the index")
    url, member = location
    data = shard_member(url, member) if member is not None else source_bytes(url, key)
    jpeg = render(data, size, max_pixels, key)
    cache.put((key, size), jpeg)
    return jpeg


async def thumbnail_route(request):
    """The route: auth, index, size, then the read and resize in a decoder thread."""
    import anyio
    import bentoml
    from starlette.responses import Response

    from serving.search import require_index

    service = bentoml.get_current_service()
    try:
        service.authorize(request)
        index = require_index(service.search_index)
        size = parse_size(request.query_params.get("size"))
        data = await anyio.to_thread.run_sync(thumbnail, index, service.thumbnails, request.path_params["key"], size,
                                              service.settings.max_pixels, limiter=service.decoders)
    except RequestError as exc:
        return service.reject(exc)
    # private: behind a token the bytes are the caller's; an index generation never changes its images
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
