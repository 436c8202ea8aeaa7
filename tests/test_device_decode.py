"""pipeline/data/device_decode.py: header checks, EXIF orientation, resize/crop on tensors, batch decode, and
the embeddings of the encoder-side decode against load_array's (PIL) through a real ONNX Runtime session.

The CPU tests run the same code as a CUDA encoder (torch tensors, IO binding); the CUDA twin at the end is
skipped without a GPU.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.data.device_decode import (decode_batch, device_decodable, exif_orient, read_header,
                                         resize_center_crop)
from pipeline.data.preprocess import BadImage, load_array
from pipeline.data.preprocess import resize_center_crop as pil_resize_center_crop
from pipeline import runtime
from pipeline.runtime import OnnxModel, usable_cpus

from helpers_serving import encode, exported_model, photo

SIZE = 32
CPU = torch.device("cpu")
MIN_COSINE = 0.999


def with_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG", **args) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif, **args)


def corrupt_huffman(jpeg: bytes) -> bytes:
    """A JPEG whose header reads fine but whose Huffman table is bogus: only decoding finds out."""
    broken = bytearray(jpeg)
    table = jpeg.find(b"\xff\xc4")
    broken[table + 5 : table + 21] = b"\xff" * 16
    return bytes(broken)


def loadable(model_dir):
    """The folder OnnxModel loads (a versioned MODEL_DIR's current version; a flat one as it is)."""
    return getattr(runtime, "resolve_model_dir", lambda folder: folder)(model_dir)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    _, model_dir = exported_model(tmp_path_factory.mktemp("decode"), "decode")
    return OnnxModel(loadable(model_dir), device="cpu", threads=1)


def fashion_jpegs(folder, count: int) -> list[bytes]:
    from pipeline.data.fashion_mnist import read_fashion_mnist

    images, _ = read_fashion_mnist("test", folder)
    return [encode(Image.fromarray(images[i]), "JPEG", quality=90) for i in range(count)]  # greyscale, 28 px


def parity_images(fashion_mnist) -> list[bytes]:
    """Real JPEGs: sizes and aspect ratios from 28 px (upscaled) to 640 px, portrait and landscape,
    greyscale, progressive, every EXIF orientation."""
    images = [encode(photo(i, size=size), "JPEG", quality=90)
              for i, size in enumerate([(80, 60), (60, 80), (640, 480), (333, 101), (32, 32), (45, 200)])]
    images.append(encode(photo(20, size=(300, 200), mode="L"), "JPEG"))
    images.append(encode(photo(21, size=(300, 200)), "JPEG", progressive=True, quality=85))
    images += [with_orientation(photo(30 + o, size=(90, 50)), o) for o in range(1, 9)]
    return images + fashion_jpegs(fashion_mnist, 8)


def items_of(images: list[bytes]) -> list:
    return [(data, read_header(data).orientation) for data in images]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orient_turns_pixels_as_pil_exif_transpose(orientation):
    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    data = with_orientation(image, orientation, "PNG")  # lossless: the comparison is exact
    header = read_header(data)
    assert header.orientation == orientation
    with Image.open(io.BytesIO(data)) as stored:
        wanted = np.asarray(ImageOps.exif_transpose(stored).convert("RGB")).transpose(2, 0, 1)
        raw = torch.from_numpy(np.asarray(stored.convert("RGB")).transpose(2, 0, 1).copy())
    assert torch.equal(exif_orient(raw, header.orientation), torch.from_numpy(np.ascontiguousarray(wanted)))


@pytest.mark.parametrize("width, height", [(28, 28), (300, 200), (80, 60), (61, 97), (32, 32), (1000, 33)])
def test_resize_center_crop_is_pil_geometry_within_one_grey_level(width, height):
    image = photo(width * height, size=(width, height))
    wanted = np.asarray(pil_resize_center_crop(image, SIZE)).transpose(2, 0, 1).astype(int)
    got = resize_center_crop(torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), SIZE)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (3, SIZE, SIZE)
    difference = np.abs(got.numpy().astype(int) - wanted)
    assert difference.max() <= 1 and difference.mean() < 0.3


def test_read_header_rejects_as_load_array_does_and_reads_nothing_else():
    jpeg = encode(photo(1, size=(300, 200)), "JPEG")
    header = read_header(jpeg)
    assert (header.format, header.mode, header.width, header.height, header.orientation) == ("JPEG", "RGB", 300, 200, 1)
    assert jpeg[header.scan - 14 : header.scan - 12] == b"\xff\xda"  # just past the SOS segment (3 components)
    assert read_header(jpeg[:1000]).pixels == 300 * 200  # a truncated body still has its header
    for data, reason, status in ((b"", "empty", 400), (b"not an image at all", "not_an_image", 400),
                                 (encode(photo(2, size=(300, 200)), "PNG"), "too_large", 413)):
        with pytest.raises(BadImage) as caught:
            read_header(data, max_pixels=50_000)
        assert (caught.value.reason, caught.value.status) == (reason, status)
        with pytest.raises(BadImage) as by_pil:
            load_array(data, SIZE, max_pixels=50_000)
        assert by_pil.value.reason == reason


def test_only_rgb_and_grey_jpegs_with_an_end_marker_are_device_decodable():
    rgb, grey = encode(photo(1, size=(300, 200)), "JPEG"), encode(photo(2, mode="L"), "JPEG")
    assert device_decodable(read_header(rgb), rgb) and device_decodable(read_header(grey), grey)
    cmyk, png = encode(photo(3, mode="CMYK"), "JPEG"), encode(photo(4), "PNG")
    assert not device_decodable(read_header(cmyk), cmyk) and not device_decodable(read_header(png), png)
    truncated = rgb[: len(rgb) // 2]
    assert not device_decodable(read_header(truncated), truncated)  # PIL's "truncated" 400, on any device
    # An embedded JPEG (as an EXIF thumbnail) before the main scan does not count as the end marker...
    thumbnail = encode(photo(5, size=(40, 30)), "JPEG")
    segment = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_thumbnail = rgb[:2] + segment + rgb[2:]
    assert device_decodable(read_header(with_thumbnail), with_thumbnail)
    cut = with_thumbnail[: len(with_thumbnail) - 1000]
    assert not device_decodable(read_header(cut), cut)
    # ... and bytes after the end marker (a motion photo's video) do not hide it
    trailer = rgb + b"ftypmp42" + bytes(range(256)) * 4
    assert device_decodable(read_header(trailer), trailer)


def test_embed_tensor_equals_the_numpy_session_call(onnx_model):
    arrays = np.stack([load_array(encode(photo(i), "JPEG"), SIZE) for i in range(5)])
    through_binding = onnx_model.embed_tensor(torch.from_numpy(arrays))
    assert through_binding.dtype == torch.float32 and through_binding.device == CPU
    assert np.array_equal(through_binding.numpy(), onnx_model(arrays))


def test_encoder_decode_embeddings_match_the_pil_path(onnx_model, fashion_mnist):
    images = parity_images(fashion_mnist)
    batch, errors = decode_batch(items_of(images), SIZE, CPU, rows=32)
    assert errors == {} and tuple(batch.shape) == (32, 3, SIZE, SIZE) and not batch[len(images):].any()
    pil = np.stack([load_array(data, SIZE) for data in images])
    pixel_error = np.abs(batch[: len(images)].numpy().astype(int) - pil.astype(int))
    assert pixel_error.mean() < 1.5, pixel_error.mean(axis=(1, 2, 3))  # draft-mode and chroma differences only
    got = onnx_model.embed_tensor(batch)[: len(images)].numpy()
    assert cosines(got, onnx_model(pil)).min() >= MIN_COSINE, cosines(got, onnx_model(pil))


def test_exif_rotated_jpegs_embed_upright(onnx_model):
    """A rotated embedding is a different embedding: orientation 6 must match the upright pixels, not the stored."""
    stored = photo(5, size=(90, 50))
    rotated = with_orientation(stored, 6, quality=95)
    batch, _ = decode_batch(items_of([rotated]), SIZE, CPU)
    upright = onnx_model(load_array(rotated, SIZE)[None])
    as_stored = onnx_model(load_array(encode(stored, "JPEG", quality=95), SIZE)[None])
    got = onnx_model.embed_tensor(batch).numpy()
    assert cosines(got, upright)[0] >= MIN_COSINE
    assert cosines(got, upright)[0] > cosines(got, as_stored)[0]


def test_a_corrupt_jpeg_fails_only_itself_and_arrays_pass_through():
    good = encode(photo(1, size=(120, 90)), "JPEG", quality=90)
    bad = corrupt_huffman(encode(photo(2, size=(300, 200)), "JPEG", quality=95))
    assert device_decodable(read_header(bad), bad)  # the header check lets it through
    array = load_array(encode(photo(3), "PNG"), SIZE)
    items = [(good, 1), (bad, 1), array, (good, 1)]
    batch, errors = decode_batch(items, SIZE, CPU)
    assert list(errors) == [1] and errors[1].reason == "corrupt" and errors[1].status == 400
    assert torch.equal(batch[2], torch.from_numpy(array)) and not batch[1].any()
    assert torch.equal(batch[0], batch[3]) and batch[0].any()
    only_bad, errors = decode_batch([(bad, 1)], SIZE, CPU)  # the PIL fallback decides alone too
    assert list(errors) == [0] and not only_bad.any()


def test_decode_settings_and_the_workers_default(monkeypatch):
    from pipeline.errors import UserError
    from serving.settings import settings_from_env

    monkeypatch.delenv("BARLOW_WORKERS", raising=False)
    monkeypatch.delenv("BARLOW_DECODE", raising=False)
    monkeypatch.setenv("BARLOW_ENCODER", "process")
    settings = settings_from_env()
    assert settings.decode == "auto" and settings.workers == 0
    assert settings.http_workers() == max(1, usable_cpus() - 1)
    monkeypatch.setenv("BARLOW_WORKERS", "3")
    monkeypatch.setenv("BARLOW_DECODE", " Encoder ")
    settings = settings_from_env()
    assert settings.http_workers() == 3 and settings.decode == "encoder"
    monkeypatch.setenv("BARLOW_DECODE", "gpu")
    with pytest.raises(UserError, match="BARLOW_DECODE must be one of auto, worker, encoder"):
        settings_from_env()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_and_io_binding_match_the_pil_path(fashion_mnist, tmp_path):
    """nvJPEG + CUDA resize + IO binding from CUDA memory, against the PIL path on the CPU."""
    _, model_dir = exported_model(tmp_path, "cuda-decode")
    gpu = OnnxModel(loadable(model_dir), device="cuda")
    cpu = OnnxModel(loadable(model_dir), device="cpu", threads=1)
    images = parity_images(fashion_mnist)
    cmyk_free = images + [corrupt_huffman(encode(photo(2, size=(300, 200)), "JPEG", quality=95))]
    batch, errors = decode_batch(items_of(cmyk_free), SIZE, torch.device("cuda"), rows=32)
    assert batch.device.type == "cuda" and list(errors) == [len(images)]
    got = gpu.embed_tensor(batch)[: len(images)]
    assert got.device.type == "cuda"
    pil = np.stack([load_array(data, SIZE) for data in images])
    assert cosines(got.cpu().numpy(), cpu(pil)).min() >= MIN_COSINE
