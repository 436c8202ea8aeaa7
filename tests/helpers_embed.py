"""Helpers for the embed/index/search tests: one exported model and one EMB_DIR per test session,
a second, genuinely different model, and tar shards with chosen members."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from helpers_serving import make_run_dir


def shared_model(tmp_path_factory) -> Path:
    """The model folder (fmnist preset: ResNet-18, 32 px, dim 512, random weights) exported once per session:
    the version folder its MODEL_DIR's current.json names, itself a flat MODEL_DIR.

    Kept under the session's base temp folder, so test_embed and test_index share one export.
    """
    from pipeline.export import export_model
    from pipeline.runtime import POINTER, resolve_model_dir

    root = tmp_path_factory.getbasetemp() / "shared-embed-model"
    if not (root / "model" / POINTER).is_file():
        export_model(make_run_dir(root / "run-embed"), root / "model")
    return resolve_model_dir(root / "model")


def shared_embeddings(tmp_path_factory, model_dir: Path, shards: Path) -> Path:
    """EMB_DIR of `shards` embedded once per session (2 decode workers, batch 32)."""
    from pipeline.embed.embed import embed

    out = tmp_path_factory.getbasetemp() / "shared-embeddings"
    if not (out / "manifest.json").is_file():
        embed(model_dir, str(shards), out, batch_size=32, workers=2)
    return out


def other_model(model_dir: Path, dest: Path) -> Path:
    """A second MODEL_DIR whose first convolution is scaled: other weights, other embeddings, other sha256."""
    import onnx
    from onnx import numpy_helper

    dest.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(model_dir / "model.onnx"))
    conv = next(t for t in graph.graph.initializer if len(t.dims) == 4)
    conv.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(conv) * 1.5, conv.name))
    onnx.save(graph, str(dest / "model.onnx"))
    info = json.loads((model_dir / "model.json").read_text())
    info["name"] = "other-resnet18"
    info["onnx_sha256"] = hashlib.sha256((dest / "model.onnx").read_bytes()).hexdigest()
    (dest / "model.json").write_text(json.dumps(info))
    return dest


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A WebDataset shard with exactly these samples (`__key__` plus extension -> bytes)."""
    import webdataset as wds

    with open(path, "wb") as file, wds.TarWriter(file, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def tar_keys(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers()]
    return list(dict.fromkeys(name.split(".", 1)[0] for name in names))


def read_rows(emb_dir: Path | str) -> dict[str, list]:
    """All live parts' columns concatenated, in part order (superseded parts left out, as readers do)."""
    from pipeline.embed.parts import find_parts

    rows: dict[str, list] = {"key": [], "source": [], "label": [], "embedding": []}
    for part in find_parts(str(emb_dir)).live.values():
        fs, path = part_fs(part.location)
        with fs.open(path, "rb") as file:
            table = pq.read_table(file).to_pydict()
        for column in rows:
            rows[column] += table[column]
    return rows


def part_fs(location: str):
    from pipeline import storage

    return storage.filesystem(location)


def fmnist_copy(index: int, size: int = 56, quality: int = 85) -> bytes:
    """Fashion-MNIST test image `index`, resized and re-encoded as JPEG: a copy the index never saw."""
    from pipeline.data.fashion_mnist import read_fashion_mnist

    images, _ = read_fashion_mnist("test")
    buffer = io.BytesIO()
    Image.fromarray(images[index]).resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def clustered_vectors(count: int, dim: int, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres: structure like real embeddings, unlike pure noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.5 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
