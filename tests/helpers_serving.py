"""Helpers for the export and serving tests: a real encoder.pt, real image bytes, the torch reference."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import Config
from pipeline.export import FeatureExtractor
from pipeline.train.checkpoint import load_encoder, save_encoder
from pipeline.train.model import build_backbone
from pipeline.train.presets import PRESETS


def make_run_dir(run_dir: Path, preset: str = "fmnist", seed: int = 0) -> Path:
    """RUN_DIR/encoder.pt with random weights and perturbed BatchNorm (so BN is not the identity)."""
    torch.manual_seed(seed)
    config = Config.from_dict(PRESETS[preset])
    backbone, _ = build_backbone(config.model)
    generator = torch.Generator().manual_seed(seed)
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.1, 0.1, generator=generator)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_encoder(run_dir / "encoder.pt", backbone, config, step=0)
    return run_dir


def exported_model(base: Path, name: str) -> tuple[Path, Path]:
    """A random fmnist-size RUN_DIR (base/run-<name>) and the version folder its export into base/model wrote
    (what base/model/current.json names; a flat MODEL_DIR itself)."""
    from pipeline.export import export_model
    from pipeline.runtime import resolve_model_dir

    run_dir = make_run_dir(base / f"run-{name}")
    export_model(run_dir, base / "model")
    return run_dir, resolve_model_dir(base / "model")


def torch_reference(run_dir: Path) -> FeatureExtractor:
    """The torch FeatureExtractor exactly as export wraps it: uint8 RGB in, backbone features out."""
    backbone, config = load_encoder(run_dir / "encoder.pt")
    return FeatureExtractor(backbone, config.views.mean, config.views.std).eval()


def torch_embed(encoder: FeatureExtractor, arrays: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return encoder(torch.from_numpy(arrays)).numpy()


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def photo(seed: int, size: tuple[int, int] = (80, 60), mode: str = "RGB") -> Image.Image:
    """A smooth, photo-like image (gradients plus an edge): survives JPEG without turning to mush."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    channels = [np.sin(x / width * rng.uniform(1, 6) + rng.uniform(0, 6)) + np.cos(y / height * rng.uniform(1, 4))
                for _ in range(3)]
    pixels = np.stack(channels, -1) + (x > width * rng.uniform(0.3, 0.7))[..., None] * 0.7
    pixels = ((pixels - pixels.min()) / np.ptp(pixels) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def sample_images() -> list[tuple[str, bytes]]:
    """One image per promised format and awkward mode, as a client would upload them."""
    rgba = photo(4).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    gif_frames = [photo(5), photo(6)]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    sixteen = Image.fromarray((np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) * 13))
    return [
        ("photo.jpg", encode(photo(1), "JPEG", quality=92)),
        ("photo.png", encode(photo(2), "PNG")),
        ("photo.webp", encode(photo(3), "WEBP", quality=90)),
        ("alpha.png", encode(rgba, "PNG")),
        ("photo.bmp", encode(photo(7), "BMP")),
        ("gray.tiff", encode(photo(8, mode="L"), "TIFF")),
        ("anim.gif", encode(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:])),
        ("rotated.jpg", encode(photo(9, size=(90, 50)), "JPEG", exif=exif)),
        ("cmyk.jpg", encode(photo(10, mode="CMYK"), "JPEG")),
        ("sixteen.png", encode(sixteen, "PNG")),
    ]


def log_tail(server, chars: int = 4000) -> str:
    """The end of a `serve.Server`'s log file, for assertion messages."""
    path = server.log_path
    return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""


def served(model_dir: Path, tmp: Path, index_dir: Path | None = None, **env: str):
    """A real `bentoml serve` of MODEL_DIR (BARLOW_* settings as keywords, BentoML's home in `tmp`) for a
    module-scoped fixture to `yield from`: it must stop cleanly (exit 0) when the module is done."""
    from pipeline.serve import start_server

    env = {"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true", **env}
    running = start_server(model_dir, env=env, index_dir=index_dir, log_file=tmp / "server.log")
    yield running
    assert running.stop() == 0, log_tail(running)
