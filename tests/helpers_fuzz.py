"""Hostile image bytes for the /embed fuzz test and bench/fuzz.py: real files, then mutated.

Seeds are real JPEG, PNG, GIF, WebP and TIFF encodings of a photo-like image. A hypothesis
strategy applies one or more mutations a hostile or broken client produces: bit flips, truncation,
random header bytes, and huge (or zero) dimensions written into the format's own size fields,
with the PNG chunk CRC recomputed so that the decoder believes them. `check_response` states what
the service must do with any of them.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib

from hypothesis import strategies as st

from helpers_serving import encode, photo

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF")
DIMENSIONS = (0, 1, 2, 255, 4096, 16383, 32767, 65535)  # 16383: WebP's largest; 65535: 16-bit fields


def seed_images() -> dict[str, bytes]:
    """One real encoding per format (two-frame GIF, lossy WebP, LZW TIFF)."""
    image = photo(21, size=(48, 40))
    return {
        "JPEG": encode(image, "JPEG", quality=90),
        "PNG": encode(image, "PNG"),
        "GIF": encode(image, "GIF", save_all=True, append_images=[photo(22, size=(48, 40))]),
        "WEBP": encode(image, "WEBP", quality=80),
        "TIFF": encode(image, "TIFF", compression="tiff_lzw"),
    }


def _put(data: bytearray, offset: int, packed: bytes) -> None:
    if 0 <= offset and offset + len(packed) <= len(data):
        data[offset:offset + len(packed)] = packed


def declare_size(fmt: str, blob: bytes, width: int, height: int) -> bytes:
    """Write width x height into the format's size fields; the pixel data stays as it was."""
    data = bytearray(blob)
    if fmt == "PNG":  # IHDR at 8: length, type, width, height (big-endian), ..., CRC over type+data
        _put(data, 16, struct.pack(">II", width, height))
        _put(data, 29, struct.pack(">I", zlib.crc32(bytes(data[12:29]))))
    elif fmt == "JPEG":  # SOFn: FF Cn, length, precision, height, width
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            at = data.find(marker)
            if at >= 0:
                _put(data, at + 5, struct.pack(">HH", min(height, 65535), min(width, 65535)))
    elif fmt == "GIF":  # logical screen, then the first image descriptor (0x2C), little-endian
        _put(data, 6, struct.pack("<HH", min(width, 65535), min(height, 65535)))
        at = data.find(b"\x2c", 13)
        if at >= 0:
            _put(data, at + 5, struct.pack("<HH", min(width, 65535), min(height, 65535)))
    elif fmt == "WEBP":  # lossy VP8: after the start code 9D 01 2A, 14-bit width and height
        at = data.find(b"\x9d\x01\x2a")
        if at >= 0:
            _put(data, at + 3, struct.pack("<HH", min(width, 16383), min(height, 16383)))
    elif fmt == "TIFF":  # first IFD: ImageWidth (256) and ImageLength (257) entries
        order = "<" if data[:2] == b"II" else ">"
        ifd = struct.unpack(order + "I", bytes(data[4:8]))[0] if len(data) >= 8 else len(data)
        count = struct.unpack(order + "H", bytes(data[ifd:ifd + 2]))[0] if ifd + 2 <= len(data) else 0
        for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(data) - 11), 12):  # mutated files lie
            tag, kind = struct.unpack(order + "HH", bytes(data[entry:entry + 4]))
            value = {256: width, 257: height}.get(tag)
            if value is not None:  # SHORT (3) or LONG (4) value stored inline
                packed = struct.pack(order + "H", min(value, 65535)) if kind == 3 else struct.pack(order + "I", value)
                _put(data, entry + 8, packed)
    return bytes(data)


@st.composite
def mutation(draw, blob: bytes, fmt: str) -> bytes:
    """One mutation of `blob`."""
    kind = draw(st.sampled_from(("bitflip", "truncate", "header", "dimensions", "splice")))
    data = bytearray(blob)
    if kind == "bitflip":
        for _ in range(draw(st.integers(1, 16))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "header":  # random bytes over the first 64, where the format's structure lives
        at = draw(st.integers(0, min(63, len(data) - 1)))
        patch = draw(st.binary(min_size=1, max_size=8))
        data[at:at + len(patch)] = patch
    elif kind == "dimensions":
        width, height = draw(st.sampled_from(DIMENSIONS)), draw(st.sampled_from(DIMENSIONS))
        data = bytearray(declare_size(fmt, bytes(data), width, height))
    else:  # repeat a slice inside the file: lengths and offsets now point at the wrong bytes
        start = draw(st.integers(0, len(data) - 1))
        end = draw(st.integers(start, min(len(data), start + 256)))
        at = draw(st.integers(0, len(data)))
        data[at:at] = data[start:end]
    return bytes(data)


@functools.cache
def _seeds() -> dict[str, bytes]:
    return seed_images()


@st.composite
def hostile_image(draw) -> tuple[str, bytes]:
    """(format, bytes): a real seed (seed_images()) with 1-3 stacked mutations."""
    fmt = draw(st.sampled_from(FORMATS))
    data = _seeds()[fmt]
    for _ in range(draw(st.integers(1, 3))):
        if data:
            data = draw(mutation(data, fmt))
    return fmt, data


def check_response(response, images: int) -> str:
    """What /embed must do with any bytes: 200 with one finite embedding per image, or a 4xx whose
    JSON body has an `error` sentence. Returns "ok" or the rejection's status as text."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    body = response.json()  # every answer, rejection included, is JSON
    if response.status_code == 200:
        embeddings = body["embeddings"]
        assert len(embeddings) == images
        assert all(math.isfinite(value) for row in embeddings for value in row)
        return "ok"
    assert 400 <= response.status_code < 500
    assert isinstance(body.get("error"), str) and len(body["error"]) > 10, body
    return str(response.status_code)
