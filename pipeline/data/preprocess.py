"""Image bytes -> the uint8 RGB CHW array every embedding path feeds the encoder.

Serving, batch embedding and evaluation all import this module, so the served embedding, the batch
embedding and the evaluated embedding of the same bytes are computed from identical pixels. The
steps: decode safely (untrusted bytes; size checked before pixels are decoded), first frame only,
EXIF orientation, RGB (alpha composited on white, 16-bit scaled to 8-bit), resize the shorter side
to the eval size (bicubic), centre crop. Standardisation (mean/std) is not here: it lives inside the ONNX graph.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
# Only formats we promise; restricting Image.open also keeps exotic decoders (EPS runs Ghostscript)
# away from untrusted bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
WHITE = (255, 255, 255, 255)


class BadImage(UserError):
    """Bytes that cannot become an image; `reason` is a short code used in metrics and responses."""

    def __init__(self, reason: str, message: str, status: int = 400):
        super().__init__(message)
        self.reason = reason
        self.status = status


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int = 0) -> Image.Image:
    """Decode the first frame of untrusted bytes, or raise BadImage saying why.

    The header is read first and the pixel count checked before any pixel is decoded. For JPEG,
    `draft_size` > 0 lets libjpeg decode at 1/2..1/8 scale while the shorter side stays >= 2x it.
    """
    if not data:
        raise BadImage("empty", "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise BadImage("too_large", f"the image has more than {max_pixels:,} pixels", 413) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not_an_image", "the bytes are not a readable JPEG, PNG, WebP, BMP, TIFF or GIF image") from None
    except Exception as exc:  # any decoder error on untrusted bytes means a bad image, never a crash
        raise BadImage("corrupt", f"the image header is corrupt ({_why(exc)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(
            "too_large", f"the image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,}", 413)
    try:
        if draft_size and image.format == "JPEG":
            image.draft(None, (2 * draft_size, 2 * draft_size))
        image.load()
    except Image.DecompressionBombError:
        raise BadImage("too_large", f"the image has more than {max_pixels:,} pixels", 413) from None
    except Exception as exc:
        if "truncated" in str(exc):
            raise BadImage("truncated", f"the {image.format} image is truncated") from None
        raise BadImage("corrupt", f"the {image.format} image is corrupt ({_why(exc)})") from None
    return image


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; broken EXIF is ignored rather than rejecting the image."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF blocks are common and harmless to the pixels
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: alpha composited on white, 16-bit and 32-bit integers scaled to 8-bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I: 16-bit range, scaled rather than clipped
        pixels = np.asarray(image).astype(np.int64).clip(0, 65535)
        gray = ((pixels * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        gray = np.asarray(image, dtype=np.float32).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise BadImage("unsupported_mode", f"images in mode {mode} are not supported") from None


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic, antialiased), then the central size x size square.

    The whole short side is kept (no 224/256-style margin): training crops cover up to the full
    image, and small images such as Fashion-MNIST keep their object.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_array(image: Image.Image, size: int) -> np.ndarray:
    """A decoded PIL image -> uint8 RGB array [3, size, size], the encoder's input."""
    square = resize_center_crop(to_rgb(upright(image)), size)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


def load_array(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Untrusted image bytes -> uint8 RGB array [3, size, size]; raises BadImage with the reason."""
    image = decode_image(data, max_pixels, draft_size=size)
    try:
        return image_to_array(image, size)
    except BadImage:
        raise
    except Exception as exc:  # a decoder can still fail lazily on odd files (e.g. broken palettes)
        raise BadImage("corrupt", f"the {image.format} image cannot be converted ({_why(exc)})") from None
