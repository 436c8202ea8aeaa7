"""`barlow export RUN_DIR --out MODEL_DIR`: the trained backbone as one ONNX file plus its metadata.

The graph takes what a client has, uint8 RGB pixels [N, 3, S, S] from `pipeline.data.preprocess`, and
standardises (mean/std) inside, so no consumer can get mean/std wrong. Its output is the backbone representation,
never the projector's. Before anything is published the ONNX Runtime output is compared with the torch
FeatureExtractor on random and real images at batch 1 and 8; a difference above tolerance fails the export and
leaves MODEL_DIR as it was. Files are written under temp names and renamed, so a crash never leaves a
half-written model. MODEL_DIR may be a bucket URL (s3://, gs://, az://): the model is exported and checked
in a local temp folder, then uploaded, model.json last, so a reader that finds model.json finds model.onnx.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline import storage
from pipeline.data.fashion_mnist import read_fashion_mnist
from pipeline.data.preprocess import load_array
from pipeline.errors import UserError
from pipeline.files import atomic_output, write_json
from pipeline.runtime import MODEL_FORMAT  # the writer and the reader share one format tag
from pipeline.train.checkpoint import load_encoder

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "embedding"
DEFAULT_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|; fp32 graphs land orders of magnitude below
PARITY_BATCHES = (1, 8)


class FeatureExtractor(nn.Module):
    """uint8 RGB [N, 3, S, S] -> backbone features [N, D]; the exact function model.onnx computes."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images.float() / 255 - self.mean) / self.std)


def export_onnx(extractor: FeatureExtractor, path: Path, image_size: int) -> int:
    """Write the one-file ONNX graph with a dynamic batch axis; returns its opset."""
    # Batch 2 in the example: torch.export would specialise a batch of 1 into a constant.
    example = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    for chatty in ("onnxscript", "onnx_ir"):  # one INFO line per optimisation pass otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    torch.onnx.export(
        extractor.eval(), (example,), str(path), dynamo=True, external_data=False, verbose=False,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: batch}},
    )
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def real_images(count: int, size: int, paths: list[Path] | None = None) -> tuple[np.ndarray, str]:
    """`count` real images through the serving preprocessing, and where they came from.

    User-given files first; else Fashion-MNIST test images (PNG bytes, the full decode path); else
    photo-like synthetic JPEGs (smooth colour fields with edges), so the check runs anywhere.
    """
    if paths:
        try:
            blobs = [Path(p).read_bytes() for p in paths[:count]]
        except OSError as exc:
            raise UserError(f"cannot read parity image {exc.filename}: {exc.strerror}") from None
        arrays = [load_array(b, size) for b in blobs]
        while len(arrays) < count:
            arrays += arrays[: count - len(arrays)]
        return np.stack(arrays), f"{len(blobs)} user images"
    try:
        pixels, _ = read_fashion_mnist("test")
        return np.stack([load_array(_png(Image.fromarray(p)), size) for p in pixels[:count]]), "fashion-mnist t10k"
    except UserError:  # not installed here: synthetic photos below
        pass
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(count):
        y, x = np.mgrid[0:96, 0:128] / 96.0
        field = np.stack([np.sin(x * rng.uniform(1, 6) + rng.uniform(0, 6)) for _ in range(3)], -1)
        field = field + (y[..., None] > rng.uniform(0.3, 0.7)) * rng.uniform(-0.8, 0.8, 3)
        image = Image.fromarray(((field - field.min()) / np.ptp(field) * 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        arrays.append(load_array(buffer.getvalue(), size))
    return np.stack(arrays), "synthetic JPEG photos"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def compare(extractor: FeatureExtractor, session: Any, images: np.ndarray) -> dict[str, float]:
    """Max absolute and relative (to the largest torch output) difference, ONNX Runtime vs torch."""
    with torch.inference_mode():
        expected = extractor(torch.from_numpy(images)).numpy()
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    max_abs = float(np.abs(actual - expected).max())
    return {"max_abs": max_abs, "max_rel": max_abs / max(float(np.abs(expected).max()), 1e-12)}


def check_parity(extractor: FeatureExtractor, onnx_path: Path, image_size: int, tolerance: float,
                 image_paths: list[Path] | None = None) -> dict[str, Any]:
    """ONNX Runtime (CPU) vs torch on random and real images at batch 1 and 8; raises above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    real, real_source = real_images(max(PARITY_BATCHES), image_size, image_paths)
    rng = np.random.default_rng(0)
    checks = []
    for batch in PARITY_BATCHES:
        random = rng.integers(0, 256, (batch, 3, image_size, image_size), dtype=np.uint8)
        for kind, images in (("random", random), ("real", real[:batch])):
            checks.append({"images": kind, "batch": batch, **compare(extractor, session, images)})
    worst = {key: max(check[key] for check in checks) for key in ("max_abs", "max_rel")}
    parity = {**worst, "tolerance": tolerance, "provider": "CPUExecutionProvider", "real_source": real_source,
              "checks": checks}
    if not worst["max_rel"] <= tolerance:  # `not <=` also catches NaN
        raise UserError(
            f"ONNX Runtime output differs from the torch FeatureExtractor by max abs {worst['max_abs']:.3g} (relative "
            f"{worst['max_rel']:.3g}), above the tolerance {tolerance:g}; the export was not written")
    return parity


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


EXPORT_PACKAGES = ("barlow-embed", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime")


def versions(packages: tuple[str, ...] = EXPORT_PACKAGES) -> dict[str, str]:
    """Python's and each installed package's version (missing packages left out)."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def encoder_path(run_dir: Path) -> Path:
    path = run_dir / "encoder.pt" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"{path} does not exist; export needs a RUN_DIR with encoder.pt (written by barlow train)")
    return path


def export_model(run_dir: str | Path, out_dir: str | Path, tolerance: float = DEFAULT_TOLERANCE,
                 image_paths: list[Path] | None = None) -> dict[str, Any]:
    """Export RUN_DIR/encoder.pt to MODEL_DIR/model.onnx + model.json; returns the model.json dict."""
    if storage.is_url(out_dir):
        storage.check_writable(out_dir)
        with tempfile.TemporaryDirectory(prefix="barlow-export-") as folder:
            info = export_model(run_dir, folder, tolerance, image_paths)
            storage.publish_folder(Path(folder), out_dir, last=("model.json",))
        return info
    checkpoint = encoder_path(Path(run_dir))
    out_dir = Path(out_dir)
    backbone, config = load_encoder(checkpoint)
    size, views = config.views.image_size, config.views
    extractor = FeatureExtractor(backbone, views.mean, views.std).eval()
    with atomic_output(out_dir / "model.onnx") as tmp_onnx:  # renamed only once the parity check passed
        logger.info("exporting %s (%s, %d px) to ONNX", checkpoint, config.model.arch, size)
        opset = export_onnx(extractor, tmp_onnx, size)
        parity = check_parity(extractor, tmp_onnx, size, tolerance, image_paths)
        with torch.inference_mode():
            dim = int(extractor(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1])
        run_name = checkpoint.resolve().parent.name
        info = {
            "format": MODEL_FORMAT,
            "name": f"{run_name}-{config.model.arch}",
            "dim": dim,
            "arch": config.model.arch,
            "image_size": size,
            "mean": list(views.mean),
            "std": list(views.std),
            "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                      "shape": ["batch", 3, size, size]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", dim],
                       "what": "backbone features (not the projector), not L2-normalised"},
            "preprocess": f"pipeline.data.preprocess.load_array: EXIF orientation, RGB, shorter side to {size} "
                          "(bicubic), centre crop; mean/std standardisation inside the graph",
            "source": {"checkpoint": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)},
            "onnx_sha256": sha256_file(tmp_onnx),
            "config": json.loads(json.dumps(config.to_dict())),  # tuples as lists, as read back
            "exporter": {"tool": "torch.onnx.export(dynamo=True)", "opset": opset},
            "versions": versions(),
            "parity": parity,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
    write_json(out_dir / "model.json", info, indent=2)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="RUN_DIR with encoder.pt (or the encoder.pt itself)")
    parser.add_argument("--out", required=True,
                        help="MODEL_DIR (a folder or bucket URL) to write model.onnx and model.json")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest accepted |onnx - torch| / max |torch| (default %(default)g)")
    parser.add_argument("--images", type=Path, nargs="+", metavar="IMAGE",
                        help="real images for the parity check (default: Fashion-MNIST test images if present)")


def run(args: argparse.Namespace) -> int:
    info = export_model(args.run_dir, args.out, args.tolerance, args.images)
    parity = info["parity"]
    print(f"exported {info['name']} to {storage.join(args.out, 'model.onnx')}: dim {info['dim']}, input uint8 "
          f"3x{info['image_size']}x{info['image_size']}; parity vs torch on {len(parity['checks'])} batches "
          f"(random + {parity['real_source']}): max abs {parity['max_abs']:.3g}, max rel {parity['max_rel']:.3g} "
          f"(tolerance {parity['tolerance']:g})")
    return 0
