"""pipeline.data.preprocess: the one decode + preprocess path of serving, batch embedding and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.preprocess import BadImage, decode_image, image_to_array, load_array, resize_center_crop, to_rgb

from helpers_serving import encode, photo, sample_images

SIZE = 32


@pytest.mark.parametrize("name,data", sample_images(), ids=[name for name, _ in sample_images()])
def test_every_promised_format_becomes_uint8_rgb_chw(name, data):
    array = load_array(data, SIZE)
    assert array.shape == (3, SIZE, SIZE) and array.dtype == np.uint8 and array.flags.c_contiguous
    assert array.std() > 5, "the picture survived (not a blank array)"
    np.testing.assert_array_equal(array, load_array(data, SIZE))  # deterministic


def test_lossless_formats_give_identical_pixels():
    image = photo(11)
    arrays = [load_array(encode(image, fmt, **args), SIZE)
              for fmt, args in (("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}))]
    for other in arrays[1:]:
        np.testing.assert_array_equal(arrays[0], other)


def test_exif_orientation_is_applied():
    image = photo(12, size=(90, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    tagged = load_array(encode(image, "PNG", exif=exif), SIZE)
    upright = load_array(encode(image.transpose(Image.Transpose.ROTATE_270), "PNG"), SIZE)
    np.testing.assert_array_equal(tagged, upright)
    assert not np.array_equal(tagged, load_array(encode(image, "PNG"), SIZE))


def test_gif_uses_the_first_frame():
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    array = load_array(encode(red, "GIF", save_all=True, append_images=[blue]), SIZE)
    assert array[0].min() > 240 and array[2].max() < 15


def test_alpha_is_composited_on_white():
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert load_array(encode(clear, "PNG"), SIZE).min() == 255
    gray_alpha = Image.new("LA", (20, 20), (0, 0))
    assert load_array(encode(gray_alpha, "PNG"), SIZE).min() == 255
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert load_array(encode(palette, "PNG", transparency=0), SIZE).min() == 255


def test_grayscale_and_cmyk_become_rgb():
    gray = to_rgb(Image.new("L", (4, 4), 77))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 4, 128, 255])  # clipping would give [0, 255, 255, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_resize_shorter_side_then_centre_crop():
    columns = np.repeat(np.arange(64, dtype=np.uint8)[None, :] * 4, 32, axis=0)  # 64 wide, 32 high
    square = resize_center_crop(Image.fromarray(columns).convert("RGB"), 16)
    assert square.size == (16, 16)
    row = np.asarray(square)[8, :, 0].astype(int)
    assert abs(row.mean() - 126) < 6, "the crop is the middle half of the columns"
    assert np.all(np.diff(row) > 0)
    tall = image_to_array(Image.new("RGB", (10, 30), (1, 2, 3)), 8)
    assert tall.shape == (3, 8, 8) and tuple(tall[:, 0, 0]) == (1, 2, 3)


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_geometry():
    big = photo(13, size=(1600, 1200))
    data = encode(big, "JPEG", quality=95)
    reduced = decode_image(data, draft_size=SIZE).size
    assert reduced == (200, 150), "libjpeg decoded at 1/8 scale, shorter side still >= 2 x 32 px"
    full = image_to_array(decode_image(data), SIZE).astype(int)
    assert np.abs(load_array(data, SIZE).astype(int) - full).mean() < 3


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"hello, I am text, not an image", "not_an_image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not_an_image"),  # never reaches Ghostscript
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not_an_image"),  # Pillow cannot even identify it
    (encode(photo(17), "PNG")[:60] + bytes(range(256)) * 8, "corrupt"),  # valid header, garbage pixel data
], ids=["empty", "text", "eps", "jpeg-magic-then-garbage", "png-header-then-garbage"])
def test_bad_bytes_give_a_reason(data, reason):
    with pytest.raises(BadImage) as info:
        load_array(data, SIZE)
    assert info.value.reason == reason and info.value.status == 400
    assert "\n" not in str(info.value)


def test_truncated_image_is_rejected():
    data = encode(photo(14, size=(400, 300)), "JPEG", quality=95)
    with pytest.raises(BadImage) as info:
        load_array(data[: len(data) // 2], SIZE)
    assert info.value.reason == "truncated"
    png = encode(photo(14, size=(400, 300)), "PNG")
    with pytest.raises(BadImage) as info:
        load_array(png[: len(png) // 2], SIZE)
    assert info.value.reason in ("truncated", "corrupt")


def test_pixel_limit_is_checked_before_decoding():
    # 8000 x 6000 = 48 MP: a few kB of PNG that would need 144 MB as RGB.
    bomb = encode(Image.new("1", (8000, 6000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(BadImage) as info:
        load_array(bomb, SIZE)
    assert info.value.reason == "too_large" and info.value.status == 413 and "48,000,000" in str(info.value)
    small = encode(photo(15), "PNG")
    with pytest.raises(BadImage, match="above the limit of 100"):
        load_array(small, SIZE, max_pixels=100)


def test_pillow_bomb_error_is_a_bad_image(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises above twice this
    with pytest.raises(BadImage) as info:
        load_array(encode(photo(16, size=(100, 100)), "PNG"), SIZE, max_pixels=10**9)
    assert info.value.reason == "too_large"


def test_real_images_come_from_fashion_mnist_or_user_files(fashion_mnist, tmp_path):
    """The export's parity-check images (pipeline/export.py real_images) go through this preprocessing."""
    from pipeline.export import real_images

    images, source = real_images(8, 32)
    assert images.shape == (8, 3, 32, 32) and source == "fashion-mnist t10k"
    assert len({image.tobytes() for image in images}) == 8
    path = tmp_path / "a.jpg"
    path.write_bytes(sample_images()[0][1])
    images, source = real_images(3, 32, [path])
    assert source == "1 user images" and (images[0] == images[2]).all()
