"""`barlow export RUN_DIR --out MODEL_DIR`: the trained backbone as a new model version, published atomically.

The graph takes what a client has, uint8 RGB pixels [N, 3, S, S] from `pipeline.data.preprocess`, and
standardises (mean/std) inside, so no consumer can get mean/std wrong. Its output is the backbone representation,
never the projector's. Before anything is published the ONNX Runtime output is compared with the torch
FeatureExtractor on random and real images at batch 1 and 8; a difference above tolerance fails the export.
`--precision both` adds model-fp16.onnx (fp16 inside, uint8 in and float32 out), gated by a per-image
cosine >= 0.999 against the fp32 torch model on real images (`fp16_parity` says how it is run).

Each export is a new folder MODEL_DIR/versions/<version>/ (UTC time + onnx sha256 prefix, so names sort by
time) holding model.onnx, model.json and maybe model-fp16.onnx. Only once it is complete and every parity
check passed does MODEL_DIR/current.json, the pointer readers resolve (`runtime.resolve_model_dir`), name
it: a temp file renamed over the old one on a disk, one PUT, the last object written, in a bucket. A
failed or killed export leaves the pointer on the previous version. The newest KEEP_VERSIONS versions
are kept, and always the version the pointer names and the one it named before (servers started before
the flip may still be loading it); older ones are deleted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import os
import platform
import shutil
import tempfile
import time
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
from pipeline.files import write_json
from pipeline.runtime import (  # the writer and the readers share one layout
    FP16_FILE, INFO_FILE, MODEL_FILE, MODEL_FORMAT, POINTER, POINTER_FORMAT, VERSIONS, read_pointer, sha256_file)
from pipeline.train.checkpoint import load_encoder

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "embedding"
DEFAULT_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|; fp32 graphs land orders of magnitude below
PARITY_BATCHES = (1, 8)
EXPORT_PRECISIONS = ("fp32", "fp16", "both")
FP16_MIN_COSINE = 0.999  # per real image, fp16 graph vs the fp32 torch FeatureExtractor
KEEP_VERSIONS = 3
STALE_BUILD_S = 3600  # a local `.build-*` folder this old was left by a killed export


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


def convert_fp16(src: Path, dst: Path) -> str:
    """model.onnx -> the same graph in float16 (weights and activations) with the I/O types kept: uint8 in,
    float32 out, so a client cannot tell the files apart. Returns how it was converted (for model.json)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    if (inp.type.tensor_type.elem_type, out.type.tensor_type.elem_type) != (onnx.TensorProto.UINT8,
                                                                           onnx.TensorProto.FLOAT):
        raise UserError("the fp16 conversion changed the graph's input or output type; the export was not written")
    onnx.save(model, str(dst))
    return "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"


def _fp16_conv():
    """Conv for onnx's reference evaluator as cuDNN runs fp16 data: fp16 tensors in, float32 accumulation,
    the output rounded to fp16. The reference's own Conv is a Python loop (minutes for a ResNet)."""
    from onnx.reference.op_run import OpRun

    class Conv(OpRun):  # the class name is the op it replaces
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            if auto_pad not in (None, "NOTSET") or X.ndim != 4:
                raise UserError(f"the fp16 check supports 2-D Conv with explicit pads, not auto_pad={auto_pad}")
            top, left, bottom, right = pads or (0, 0, 0, 0)
            x = torch.nn.functional.pad(torch.from_numpy(X.astype(np.float32)), (left, right, top, bottom))
            y = torch.nn.functional.conv2d(x, torch.from_numpy(W.astype(np.float32)),
                                           None if B is None else torch.from_numpy(B.astype(np.float32)),
                                           stride=tuple(strides or (1, 1)), dilation=tuple(dilations or (1, 1)),
                                           groups=group or 1)
            return (y.numpy().astype(X.dtype),)

    return Conv


def run_fp16(path: Path, images: np.ndarray) -> tuple[np.ndarray, str]:
    """The fp16 file's output for `images`, and what ran it.

    ONNX Runtime's CUDA provider when it loads (the real thing). Else onnx's reference evaluator on the
    same file: every tensor between ops stays fp16 as in the file, Conv accumulates in float32 (as cuDNN
    does), elementwise ops run in numpy float16. ONNX Runtime's CPU provider is no evidence: it has no
    fp16 Conv kernel and inserts casts that run the whole graph in float32 with fp16-rounded weights.
    """
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                             "CPUExecutionProvider"])
        if session.get_providers()[0] == "CUDAExecutionProvider":
            return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], "CUDAExecutionProvider"
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path), new_ops=[_fp16_conv()])
    outputs = [evaluator.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + 1]})[0] for i in range(len(images))]
    return np.concatenate(outputs), "onnx.reference (fp16 tensors, float32-accumulating Conv)"


def check_fp16_parity(extractor: FeatureExtractor, fp16_path: Path, image_size: int,
                      image_paths: list[Path] | None = None, min_cosine: float | None = None) -> dict[str, Any]:
    """Per-image cosine of the fp16 graph vs the fp32 torch FeatureExtractor on real images; raises below
    `min_cosine` (default FP16_MIN_COSINE; fp16 moves every value a little, the direction must hold)."""
    min_cosine = FP16_MIN_COSINE if min_cosine is None else min_cosine
    images, source = real_images(max(PARITY_BATCHES), image_size, image_paths)
    with torch.inference_mode():
        expected = extractor(torch.from_numpy(images)).numpy().astype(np.float64)
    actual, evaluator = run_fp16(fp16_path, images)
    actual = actual.astype(np.float64)
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    cosines = (actual * expected).sum(1) / np.maximum(norms, 1e-30)
    worst = float(np.nan_to_num(cosines, nan=-1.0).min())
    max_abs = float(np.abs(actual - expected).max())
    parity = {"min_cosine": worst, "threshold": min_cosine, "images": len(images), "real_source": source,
              "evaluator": evaluator, "max_abs": max_abs,
              "max_rel": max_abs / max(float(np.abs(expected).max()), 1e-12), "cosines": [float(c) for c in cosines]}
    if not worst >= min_cosine:  # `not >=` also catches NaN
        raise UserError(f"the fp16 graph's embeddings reach cosine {worst:.6f} with the fp32 torch FeatureExtractor on "
                        f"a real image ({evaluator}), below {min_cosine}; the export was not written")
    return parity


def build_version(run_dir: str | Path, folder: Path, tolerance: float, image_paths: list[Path] | None,
                  precision: str) -> dict[str, Any]:
    """Export into the empty local `folder`: model.onnx (+ model-fp16.onnx), then model.json once every
    parity check passed. Returns the model.json dict, whose `version` names the folder to publish."""
    checkpoint = encoder_path(Path(run_dir))
    backbone, config = load_encoder(checkpoint)
    size, views = config.views.image_size, config.views
    extractor = FeatureExtractor(backbone, views.mean, views.std).eval()
    onnx_path = folder / MODEL_FILE
    logger.info("exporting %s (%s, %d px) to ONNX", checkpoint, config.model.arch, size)
    opset = export_onnx(extractor, onnx_path, size)
    parity = check_parity(extractor, onnx_path, size, tolerance, image_paths)
    fp16 = None
    converter = None
    if precision in ("fp16", "both"):
        converter = convert_fp16(onnx_path, folder / FP16_FILE)
        fp16 = {"file": FP16_FILE, "sha256": sha256_file(folder / FP16_FILE),
                "parity": check_fp16_parity(extractor, folder / FP16_FILE, size, image_paths)}
    with torch.inference_mode():
        dim = int(extractor(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1])
    onnx_sha256 = sha256_file(onnx_path)
    now = dt.datetime.now(dt.timezone.utc)
    run_name = checkpoint.resolve().parent.name
    info = {
        "format": MODEL_FORMAT,
        "name": f"{run_name}-{config.model.arch}",
        "version": f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{onnx_sha256[:12]}",
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
        "onnx_sha256": onnx_sha256,
        "precisions": ["fp32", "fp16"] if fp16 else ["fp32"],
        "fp16": fp16,
        "config": json.loads(json.dumps(config.to_dict())),  # tuples as lists, as read back
        "exporter": {"tool": "torch.onnx.export(dynamo=True)", "opset": opset, "fp16": converter},
        "versions": versions(),
        "parity": parity,
        "created": now.isoformat(timespec="seconds"),
    }
    write_json(folder / INFO_FILE, info, indent=2)
    return info


def export_model(run_dir: str | Path, out_dir: str | Path, tolerance: float = DEFAULT_TOLERANCE,
                 image_paths: list[Path] | None = None, precision: str = "fp32",
                 keep: int = KEEP_VERSIONS) -> dict[str, Any]:
    """Export RUN_DIR/encoder.pt as a new version of MODEL_DIR and point current.json at it; returns model.json.

    Nothing a reader resolves changes until the version is complete: it is built in a private folder
    (MODEL_DIR/versions/.build-* on a disk, so the rename is atomic; a local temp folder for a bucket,
    uploaded model.json last), then the pointer is replaced, then old versions are pruned.
    """
    if precision not in EXPORT_PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(EXPORT_PRECISIONS)}, not {precision!r}")
    if keep < 1:
        raise UserError(f"--keep must be at least 1, not {keep}")
    encoder_path(Path(run_dir))
    storage.check_writable(out_dir)
    read_pointer(out_dir)  # a damaged pointer is reported before minutes of export
    url = storage.is_url(out_dir)
    staging = None
    if not url:
        staging = storage.local_path(out_dir) / VERSIONS
        staging.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(staging)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=staging))
    try:
        info = build_version(run_dir, build, tolerance, image_paths, precision)
        target = storage.join(out_dir, VERSIONS, info["version"])
        if url:
            storage.publish_folder(build, target, last=(INFO_FILE,))
        else:
            build.chmod(0o755)  # mkdtemp's folder is private; a published version is as readable as MODEL_DIR
            sync_folder(build)
            os.rename(build, target)
            sync_folder(staging)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    previous = read_pointer(out_dir)
    pointer = {"format": POINTER_FORMAT, "version": info["version"], "path": f"{VERSIONS}/{info['version']}",
               "name": info["name"], "onnx_sha256": info["onnx_sha256"],
               "fp16_sha256": info["fp16"]["sha256"] if info["fp16"] else None,
               "previous": previous["version"] if previous else None,
               "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    storage.write_json(storage.join(out_dir, POINTER), pointer, indent=2)  # the flip: one rename or one PUT
    prune_versions(out_dir, keep, pointer)
    return info


def sync_folder(folder: Path) -> None:
    """fsync a folder's files and the folder itself, so a rename that publishes it survives a crash."""
    for path in [*sorted(p for p in folder.iterdir() if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_builds(versions_dir: Path) -> None:
    """Delete `.build-*` folders of exports killed midway (old enough that no export is still writing them)."""
    for build in versions_dir.glob(".build-*"):
        try:
            if time.time() - build.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(build, ignore_errors=True)
        except OSError:
            pass


def list_versions(out_dir: str | Path) -> list[str]:
    """Names of the published version folders of MODEL_DIR, oldest first."""
    root = storage.join(out_dir, VERSIONS)
    if not storage.is_url(out_dir):
        folder = storage.local_path(root)
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []
    if not storage.exists(root):
        return []
    prefix = root.rstrip("/") + "/"
    return sorted({name[len(prefix):].split("/", 1)[0] for name in storage.list_files(root)
                   if name.startswith(prefix) and "/" in name[len(prefix):]})


def prune_versions(out_dir: str | Path, keep: int, pointer: dict[str, Any]) -> list[str]:
    """Delete all but the newest `keep` versions, never the pointer's version or its previous one
    (servers that resolved the pointer before the flip may still be reading it). Returns the deleted names."""
    names = list_versions(out_dir)
    kept = set(names[-keep:]) | {pointer["version"], pointer.get("previous")}
    doomed = [name for name in names if name not in kept]
    for name in doomed:
        folder = storage.join(out_dir, VERSIONS, name)
        if storage.is_url(out_dir):
            for location in storage.list_files(folder):
                storage.remove(location)
        else:
            shutil.rmtree(storage.local_path(folder), ignore_errors=True)
        logger.info("deleted old model version %s", name)
    return doomed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="RUN_DIR with encoder.pt (or the encoder.pt itself)")
    parser.add_argument("--out", required=True,
                        help="MODEL_DIR (a folder or bucket URL): writes versions/<version>/ and then current.json")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest accepted |onnx - torch| / max |torch| (default %(default)g)")
    parser.add_argument("--images", type=Path, nargs="+", metavar="IMAGE",
                        help="real images for the parity check (default: Fashion-MNIST test images if present)")
    parser.add_argument("--precision", choices=EXPORT_PRECISIONS, default="fp32",
                        help="fp32: model.onnx; fp16 or both: model.onnx and model-fp16.onnx, which GPU servers "
                             "load (default %(default)s)")
    parser.add_argument("--keep", type=int, default=KEEP_VERSIONS,
                        help="versions to keep besides the live ones (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    info = export_model(args.run_dir, args.out, args.tolerance, args.images, args.precision, args.keep)
    parity = info["parity"]
    print(f"exported {info['name']} version {info['version']} to "
          f"{storage.join(args.out, VERSIONS, info['version'])} and pointed {storage.join(args.out, POINTER)} at it: "
          f"dim {info['dim']}, input uint8 3x{info['image_size']}x{info['image_size']}; parity vs torch on "
          f"{len(parity['checks'])} batches (random + {parity['real_source']}): max abs {parity['max_abs']:.3g}, "
          f"max rel {parity['max_rel']:.3g} (tolerance {parity['tolerance']:g})")
    if info["fp16"]:
        fp16 = info["fp16"]["parity"]
        print(f"fp16: {FP16_FILE}, min cosine {fp16['min_cosine']:.6f} over {fp16['images']} real images "
              f"(threshold {fp16['threshold']}; run by {fp16['evaluator']})")
    return 0
