"""`barlow search INDEX_DIR --model MODEL_DIR IMAGE... [-k K]` (or `--key KEY`): nearest neighbours.

`SearchIndex` is the loaded INDEX_DIR and is shared with the service's POST /search. A query is
embedded exactly as `barlow embed` embedded the collection (shared preprocessing, the same ONNX
graph, L2-normalised), and only with the model the index was built from: a different model's
vectors live in another space, so its sha256 must match. Output: one JSON line per neighbour with
query, rank, key, source, label and score (cosine similarity, 1 = identical direction).

INDEX_DIR may be a bucket URL: index.json is read first, then the generation it names is downloaded
(storage.local_copy's cache) and loaded into memory, so the files agree even while `barlow index`
updates it (pipeline/embed/index.py describes the layout).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.preprocess import DEFAULT_MAX_PIXELS
from pipeline.devices import RUNTIME_DEVICES
from pipeline.embed.parts import ROW_COLUMNS, TAR_SUFFIXES, with_row_columns
from pipeline.errors import UserError
from pipeline.runtime import l2_normalize

logger = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # else one INFO line per CPU feature it probes

INDEX_FORMAT = "barlow-embed/index/2"
INDEX_JSON = "index.json"  # names the current generation; written last, whole
INDEX_FILE, KEYS_FILE = "index.faiss", "keys.parquet"  # inside the generation folder
DEFAULT_K = 10
MAX_K = 1000


class SearchIndex:
    """INDEX_DIR (a folder or bucket URL) loaded: the faiss index, its rows' keys/sources/labels and index.json."""

    def __init__(self, index_dir: str | Path):
        self.dir = index_dir
        self.info = read_info(index_dir)
        self.index, rows = load_generation(fetch_generation(index_dir, self.info), self.info, index_dir,
                                           columns=list(ROW_COLUMNS))
        self.rows = with_row_columns(rows)
        apply_search_params(self.index, self.info)
        self.model = self.info["model"]
        self.dim = int(self.info["dim"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def check_model(self, model_info: dict[str, Any]) -> None:
        """Refuse a model other than the one whose embeddings were indexed."""
        sha = model_info.get("onnx_sha256", "")
        if sha != self.model.get("sha256"):
            raise UserError(
                f"the index {self.dir} was built from {self.model.get('name')} "
                f"(sha256 {str(self.model.get('sha256'))[:12]}), "
                f"not from {model_info.get('name')} (sha256 {sha[:12]}); search it with the model it was built from, "
                "or re-embed and re-index with this one")

    def row(self, i: int, score: float) -> dict[str, Any]:
        return {"key": self.rows["key"][i].as_py(), "source": self.rows["source"][i].as_py(),
                "label": self.rows["label"][i].as_py(), "score": round(float(score), 6)}

    def search(self, embeddings: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """The k nearest indexed items of each embedding, best first."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected embeddings [N, {self.dim}], got {list(embeddings.shape)}")
        scores, ids = self.index.search(l2_normalize(embeddings), min(k, len(self)))
        return [[self.row(int(i), s) for i, s in zip(row_ids, row_scores) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]

    def rows_of_key(self, key: str) -> list[int]:
        import pyarrow.compute as pc

        return np.flatnonzero(pc.equal(self.rows["key"], key).to_numpy(zero_copy_only=False)).tolist()

    def neighbours_of_key(self, key: str, k: int) -> list[dict[str, Any]]:
        """The k nearest other items of an indexed item (its stored vector as the query)."""
        rows = self.rows_of_key(key)
        if not rows:
            raise UserError(f"key {key!r} is not in the index {self.dir}")
        if len(rows) > 1:
            logger.warning("key %r is in the index %d times; using its first row", key, len(rows))
        vector = self.reconstruct(rows[0])
        found = self.search(vector[None], k + len(rows))[0]
        return [hit for hit in found if hit["key"] != key][:k]

    def image_location(self, key: str) -> tuple[str, str | None] | None:
        """Where an indexed key's image bytes live: (tar shard URL, member key) or (object URL or path, None);
        None for a key not in the index. An index from before the shard column names a shard as the source."""
        rows = self.rows_of_key(key)
        if not rows:
            return None
        shard, source = self.rows["shard"][rows[0]].as_py(), self.rows["source"][rows[0]].as_py()
        if shard is None and source.endswith(TAR_SUFFIXES):
            shard = source
        return (shard, key) if shard is not None else (source, None)

    def reconstruct(self, row: int) -> np.ndarray:
        import faiss

        if self.info.get("kind") != "flat":
            faiss.extract_index_ivf(self.index).make_direct_map()  # IVF stores no row -> list map by default
        return self.index.reconstruct(row)


def read_info(index_dir: str | Path) -> dict[str, Any]:
    """INDEX_DIR's index.json, checked to be this format."""
    location = storage.join(index_dir, INDEX_JSON)
    if not storage.exists(location):
        raise UserError(f"{index_dir} is not an INDEX_DIR (missing {INDEX_JSON}); build it with barlow index")
    try:
        info = json.loads(storage.read_text(location))
    except ValueError as exc:
        raise UserError(f"cannot read {location}: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise UserError(f"{location} is not a {INDEX_FORMAT} index; rebuild it with barlow index")
    return info


def generation_files(info: dict[str, Any]) -> tuple[str, str]:
    """The index and keys files of the generation index.json names, relative to INDEX_DIR."""
    return f"{info['generation']}/{INDEX_FILE}", f"{info['generation']}/{KEYS_FILE}"


def fetch_generation(index_dir: str | Path, info: dict[str, Any]) -> Path:
    """A local folder holding the generation `info` names: INDEX_DIR itself, or its download into the cache
    (storage.local_copy); a generation never changes once written, so a cached copy stays valid."""
    return storage.local_copy(index_dir, generation_files(info))


def local_index(index_dir: str | Path) -> Path:
    """INDEX_DIR as a complete local folder: itself, or index.json and the generation it names downloaded.

    index.json is read once and written beside the files it names (after them), so the copy agrees with
    itself even when an update flips INDEX_DIR meanwhile; for the server, which opens a local folder.
    """
    if not storage.is_url(index_dir):
        return storage.local_path(index_dir)
    info = read_info(index_dir)
    folder = fetch_generation(index_dir, info)
    storage.write_json(folder / INDEX_JSON, info)
    return folder


def load_generation(folder: Path, info: dict[str, Any], name: str | Path, columns: list[str] | None = None):
    """(faiss index, keys table) of the generation `info` names in local `folder`, checked to agree with it."""
    import faiss
    import pyarrow.parquet as pq

    paths = [folder / relative for relative in generation_files(info)]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise UserError(f"{name} is incomplete (missing {', '.join(missing)} of {info['generation']}); "
                        "rebuild it with barlow index")
    try:
        index = faiss.read_index(str(paths[0]))
        present = set(pq.read_schema(paths[1]).names)  # older generations lack later columns (shard)
        rows = pq.read_table(paths[1], columns=[c for c in columns if c in present] if columns else None)
    except Exception as exc:  # faiss raises RuntimeError, pyarrow ArrowInvalid on damaged files
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{name} is unreadable ({reason}); rebuild it with barlow index") from None
    if not (index.ntotal == rows.num_rows == info.get("count")):
        raise UserError(f"{name} is inconsistent (index {index.ntotal} rows, keys {rows.num_rows}, "
                        f"{INDEX_JSON} {info.get('count')}); rebuild it with barlow index")
    return index, rows


def apply_search_params(index, info: dict[str, Any]) -> None:
    """Set the query-time knobs that index.json records: it is their source of truth, and an index fresh
    from `new_index` (the benchmark's) still has faiss's defaults (nprobe 1, k_factor 1)."""
    import faiss

    if "nprobe" in info:
        faiss.extract_index_ivf(index).nprobe = int(info["nprobe"])
    if "k_factor" in info:
        faiss.downcast_index(index).k_factor = float(info["k_factor"])


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise UserError(f"-k must be between 1 and {MAX_K}, not {k}")
    return k


def embed_files(model_dir: Path, paths: list[str | Path], device: str = "auto",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, dict[str, Any]]:
    """Image files -> L2-normalised embeddings, preprocessed as /embed and barlow embed do."""
    from pipeline.data.preprocess import BadImage, load_array
    from pipeline.runtime import OnnxModel, load_model_info

    info = load_model_info(model_dir)
    size = int(info["image_size"])
    arrays = []
    for path in paths:
        try:
            arrays.append(load_array(storage.read_bytes(path), size, max_pixels))
        except BadImage as exc:
            raise UserError(f"{path}: {exc}") from None
    encoder = OnnxModel(model_dir, device, max_batch=len(arrays))
    return l2_normalize(encoder(np.stack(arrays))), info


def search_images(index_dir: str | Path, model_dir: str | Path, images: list[str | Path], k: int = DEFAULT_K,
                  device: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
    """One record per (query image, neighbour): query, rank, key, source, label, score."""
    from pipeline.runtime import load_model_info, resolve_model_dir

    check_k(k)
    index = SearchIndex(index_dir)
    model_dir = resolve_model_dir(model_dir)  # once: the check and the embedding use one version
    index.check_model(load_model_info(model_dir))
    embeddings, _ = embed_files(model_dir, [str(p) for p in images], device, max_pixels)
    results = index.search(embeddings, k)
    return [{"query": str(query), "rank": rank, **hit}
            for query, hits in zip(images, results) for rank, hit in enumerate(hits, 1)]


def search_key(index_dir: str | Path, key: str, k: int = DEFAULT_K) -> list[dict[str, Any]]:
    check_k(k)
    index = SearchIndex(index_dir)
    return [{"query": key, "rank": rank, **hit} for rank, hit in enumerate(index.neighbours_of_key(key, k), 1)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index_dir", help="INDEX_DIR written by barlow index (a folder or bucket URL)")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="query images (paths or bucket URLs)")
    # nargs="+": argparse (3.11) cannot take positionals after an option once INDEX_DIR matched, so the
    # documented form `INDEX_DIR --model MODEL_DIR IMAGE...` collects the images here.
    parser.add_argument("--model", nargs="+", metavar=("MODEL_DIR", "IMAGE"),
                        help="the MODEL_DIR the index was built from, then the query images")
    parser.add_argument("--key", help="instead of images: the neighbours of this indexed key")
    parser.add_argument("-k", type=int, default=DEFAULT_K, help="neighbours per query (default %(default)s)")
    parser.add_argument("--device", default="auto", choices=RUNTIME_DEVICES,
                        help="ONNX Runtime device for embedding the query images (default %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="refuse query images with more pixels than this (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    model_dir, images = (args.model[0], args.images + args.model[1:]) if args.model else (None, args.images)
    if args.key is not None and images:
        raise UserError("give query IMAGEs or --key, not both")
    if args.key is not None:
        records = search_key(args.index_dir, args.key, args.k)
    elif not images:
        raise UserError("give one or more query IMAGEs (with --model MODEL_DIR) or --key KEY")
    elif model_dir is None:
        raise UserError("query images need --model MODEL_DIR, the model the index was built from")
    else:
        records = search_images(args.index_dir, model_dir, images, args.k, args.device, args.max_pixels)
    for record in records:
        print(json.dumps(record))
    return 0
