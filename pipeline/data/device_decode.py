"""Decode a batch of images where the model runs: JPEGs on the model's device, the same pixels as load_array.

Serving with BARLOW_DECODE=worker decodes every image with PIL in the HTTP workers (load_array);
with a GPU encoder those CPUs, not the GPU, then bound the throughput. With BARLOW_DECODE=encoder the
workers only read each image's header (`read_header`: format, size against the pixel limit, EXIF orientation;
nothing decoded) and forward JPEG bytes; the encoder process then

1. decodes all JPEGs of a batch in one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on
   CUDA, libjpeg-turbo on the CPU); if that call fails, each JPEG is retried alone, and one that still
   fails goes through `load_array` (PIL), whose BadImage fails that image only;
2. applies the EXIF orientation on the device (`exif_orient`): torchvision's `apply_exif_orientation`
   is "only implemented for JPEG format on CPU" (its CUDA branch never sees the flag, 0.29 source), so
   the orientation comes from the header the worker read anyway, for both devices alike;
3. resizes the shorter side to S and centre-crops on the device (`resize_center_crop`), with
   load_array's geometry and PIL's filter (bicubic, antialiased, a = -0.5): within one grey level of
   PIL per pixel.

Images this path does not take (PNG, WebP, GIF, CMYK JPEGs, JPEGs without an end marker) are decoded by
`load_array` in the worker as before and travel as uint8 arrays in the same batch (`Item`).
Differences from load_array, all within the parity test's cosine 0.999: PIL decodes big JPEGs at a
DCT-reduced scale (draft mode) and rounds between its two resize passes; nvJPEG's IDCT and chroma
upsampling need not match libjpeg-turbo's bit for bit. Pure torch/torchvision/PIL (torch imported only
where pixels are touched): importable without bentoml or onnxruntime.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image

from pipeline.data.preprocess import DEFAULT_MAX_PIXELS, FORMATS, BadImage, load_array

if TYPE_CHECKING:  # torch is imported where pixels are touched: the HTTP workers read headers only
    import torch

logger = logging.getLogger(__name__)

ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads
DEVICE_MODES = ("RGB", "L")  # JPEG modes decode_jpeg turns into RGB as PIL does (not CMYK/YCCK)
EOI = b"\xff\xd9"  # end of image

# What crosses to the encoder per image: a JPEG to decode there (bytes, EXIF orientation), or the uint8
# [3, S, S] array load_array made in the worker.
Item = Union[tuple[bytes, int], np.ndarray]


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding a pixel."""

    format: str
    mode: str
    width: int
    height: int
    orientation: int  # EXIF orientation 1-8 (1: as stored)
    scan: int = 0  # JPEG: where the main image's entropy-coded data starts (after its SOS segment)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """The header of untrusted bytes, or BadImage with the reason and status `decode_image` would give
    (empty, not an image, corrupt header, too many pixels: 413). Nothing is decoded."""
    if not data:
        raise BadImage("empty", "the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            scan = image.fp.tell() if image.format == "JPEG" else 0  # PIL stops reading at the first SOS
            return _checked(Header(image.format, image.mode, width, height, _orientation(image), scan), max_pixels)
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage("too_large", f"the image has more than {max_pixels:,} pixels", 413) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not_an_image", "the bytes are not a readable JPEG, PNG, WebP, BMP, TIFF or GIF image") from None
    except Exception as exc:  # any parser error on untrusted bytes means a bad image, never a crash
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise BadImage("corrupt", f"the image header is corrupt ({first})") from None


def _checked(header: Header, max_pixels: int) -> Header:
    if header.pixels > max_pixels:
        raise BadImage("too_large", f"the image is {header.width}x{header.height} = {header.pixels:,} pixels, above "
                       f"the limit of {max_pixels:,}", 413)
    return header


def _orientation(image: Image.Image) -> int:
    """EXIF orientation as ImageOps.exif_transpose reads it (EXIF, else XMP); broken EXIF counts as 1."""
    try:
        value = int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # malformed EXIF blocks are common and harmless; load_array ignores them too
        return 1
    return value if 1 <= value <= 8 else 1


def device_decodable(header: Header, data: bytes) -> bool:
    """A JPEG the device decoder turns into the pixels PIL would: RGB or greyscale, with an end-of-image
    marker after the start of its main scan (entropy-coded data cannot contain one, so a truncated JPEG has
    none there, while an EXIF thumbnail's comes before it and a motion photo's trailer after it). A
    truncated JPEG stays with PIL, which rejects it the same way whatever the device."""
    return (header.format == "JPEG" and header.mode in DEVICE_MODES and header.scan > 0
            and data.rfind(EOI) >= header.scan)


def exif_orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """CHW (or NCHW) pixels as stored -> upright, exactly as ImageOps.exif_transpose."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 CHW -> uint8 [3, size, size]: preprocess.resize_center_crop's geometry (shorter side to
    `size`, bicubic antialiased, central square) on the tensor's device."""
    import torch
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    pixels = image[None].float()
    if (new_w, new_h) != (width, height):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    square = pixels[0, :, top : top + size, left : left + size]
    return square.round_().clamp_(0, 255).to(torch.uint8)


def _as_tensor(data: bytes) -> torch.Tensor:
    import torch

    with warnings.catch_warnings():  # decode_jpeg only reads its input: a read-only buffer is fine
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=torch.uint8)


def decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 RGB CHW on `device` per JPEG, None where the decoder refuses one. One batched call first
    (nvJPEG decodes a list far faster than one by one); if it fails, each JPEG alone, so one bad stream
    costs only itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [_as_tensor(blob) for blob in blobs]
    with warnings.catch_warnings():
        # Deprecated in torchvision 0.29 in favour of torchcodec; still the batched nvJPEG entry point
        # of the releases we support (0.21-0.29).
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                                category=DeprecationWarning)
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except Exception as exc:  # RuntimeError from libjpeg/nvJPEG on a bad stream
            logger.debug("batched JPEG decode failed (%s); decoding one by one", exc)
        decoded: list[torch.Tensor | None] = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg([tensor], mode=ImageReadMode.RGB, device=device)[0])
            except Exception:  # this one's fault: PIL decides below
                decoded.append(None)
        return decoded


def decode_batch(items: list[Item], size: int, device: torch.device, rows: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, dict[int, BadImage]]:
    """A batch of items -> (uint8 [max(rows, N), 3, size, size] on `device`, {index: BadImage}).

    Arrays are copied in as they are; JPEGs are decoded, oriented, resized and cropped on the device.
    A JPEG the device decoder refuses goes through load_array (PIL); if that fails too, its BadImage is
    returned under its index and its row stays zero, so one bad image never fails the batch. Rows past
    N (padding to a warmed batch shape) are zero.
    """
    import torch

    batch = torch.zeros((max(rows, len(items)), 3, size, size), dtype=torch.uint8, device=device)
    errors: dict[int, BadImage] = {}
    arrays = [i for i, item in enumerate(items) if isinstance(item, np.ndarray)]
    if arrays:
        stacked = torch.from_numpy(np.stack([items[i] for i in arrays]))
        batch[torch.tensor(arrays, device=device)] = stacked.to(device, non_blocking=True)
    jpegs = [i for i, item in enumerate(items) if not isinstance(item, np.ndarray)]
    if not jpegs:
        return batch, errors
    for i, image in zip(jpegs, decode_jpegs([items[i][0] for i in jpegs], device)):
        data, orientation = items[i]
        if image is not None:
            batch[i] = resize_center_crop(exif_orient(image, orientation), size)
            continue
        try:  # e.g. a stream nvJPEG refuses: PIL reads it, or says what is wrong with it
            batch[i] = torch.from_numpy(load_array(data, size, max_pixels)).to(device)
        except BadImage as exc:
            errors[i] = exc
    return batch, errors


def sample_jpeg(size: int = 64) -> bytes:
    """A small valid JPEG, to warm the decoder up (nvJPEG's first call sets up its state)."""
    buffer = io.BytesIO()
    gradient = np.linspace(0, 255, size * size * 3).astype(np.uint8).reshape(size, size, 3)
    Image.fromarray(gradient).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
