"""`barlow index EMB_DIR --out INDEX_DIR [--kind flat|ivf-pq]`: a faiss index over the embeddings.

Similarity is cosine: vectors are L2-normalised and compared by inner product. `flat` is exact and
the default; `ivf-pq` is for collections too large to scan, trained on a sample: an inverted file of
sqrt-N-ish lists scanned with 4-bit fast-scan product-quantisation codes (D/16 bytes), whose best
k x K_FACTOR candidates are re-ranked with 8-bit scalar-quantised vectors (D bytes). PQ codes alone
rank embeddings poorly; the re-ranking recovers most of flat's recall at about a quarter of its
memory (bench/embed_throughput.py measures both). INDEX_DIR holds `index.faiss`,
`keys.parquet` (row -> key, source, label) and `index.json` (model, dim, metric, kind, count),
each written under a temp name and renamed; `index.json` goes last, and loading checks the three
agree. Embeddings of different models are never mixed: the model's sha256 must match in every part.
faiss is imported only here and in search, so `pipeline` imports without it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.embed.embed import read_part_meta
from pipeline.embed.search import INDEX_FORMAT
from pipeline.errors import UserError
from pipeline.files import atomic_output, write_json
from pipeline.runtime import l2_normalize

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf-pq")
METRIC = "cosine"
MIN_IVF_PQ = 10_000  # below this flat is fast anyway, and the lists would get too few training points
DEFAULT_NPROBE = 32
K_FACTOR = 128  # candidates re-ranked per wanted neighbour (bench/embed_throughput.py: recall vs latency)
TRAIN_POINTS_PER_LIST = 40  # faiss warns below 39 training points per centroid


def read_parts(emb_dir: Path) -> tuple[list[Path], dict[str, Any]]:
    """The parts of EMB_DIR and their common model; refuses parts of different models."""
    if not Path(emb_dir).is_dir():
        raise UserError(f"{emb_dir} is not a folder; create it with barlow embed MODEL_DIR --out {emb_dir}")
    parts = sorted(Path(emb_dir).glob("part-*.parquet"))
    if not parts:
        raise UserError(f"{emb_dir} holds no part-*.parquet files; run barlow embed first")
    model, first = None, None
    for path in parts:
        meta = read_part_meta(path)
        if meta is None:
            raise UserError(f"{path} is not a readable embeddings part; delete it and re-run barlow embed")
        if model is None:
            model, first = meta["model"], path.name
        elif meta["model"].get("sha256") != model.get("sha256"):
            other = meta["model"]
            raise UserError(
                f"{emb_dir} mixes embeddings of different models: {first} is {model.get('name')} (sha256 "
                f"{str(model.get('sha256'))[:12]}) but {path.name} is {other.get('name')} (sha256 "
                f"{str(other.get('sha256'))[:12]}); index each model's embeddings separately")
    return parts, model


def read_embeddings(path: Path):
    """(table of key/source/label, float32 [N, D] unit vectors) of one part."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return table.select(["key", "source", "label"]), l2_normalize(vectors)


def pq_subquantizers(dim: int) -> int:
    """Bytes per code: the largest divisor of D that is at most D / 8 (64 for 512, 256 for 2048)."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def ivf_lists(count: int) -> int:
    """Inverted lists: ~sqrt(N) (316 for 1e5, 1000 for 1e6), kept low enough that each gets training points.

    faiss suggests up to 16 sqrt(N) for speed at very large N; sqrt(N) keeps training affordable on a
    CPU (k-means cost grows with lists x training points) and nprobe lists still cover a good share.
    """
    return int(max(16, min(65536, math.sqrt(count), count // TRAIN_POINTS_PER_LIST)))


def search_lists(nlist: int) -> int:
    """Lists scanned per query (nprobe): 32, or 1/16 of the lists when there are more (10^6 vectors:
    1000 lists, 62 scanned), which buys recall for little latency."""
    return min(nlist, max(DEFAULT_NPROBE, nlist // 16))


def new_index(kind: str, dim: int, count: int):
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if count < MIN_IVF_PQ:
        raise UserError(f"ivf-pq needs at least {MIN_IVF_PQ:,} embeddings to train on, and {count:,} are there; "
                        "use --kind flat (exact, and fast at this size)")
    nlist, m = ivf_lists(count), pq_subquantizers(dim)
    # x4fsr: 4-bit codes of the residual to the list centroid, scanned with SIMD fast-scan;
    # Refine(SQ8): the re-ranking store, one byte per dimension.
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x4fsr,Refine(SQ8)", faiss.METRIC_INNER_PRODUCT)
    return index, {"nlist": nlist, "pq_bytes": m // 2, "refine": "SQ8", "k_factor": K_FACTOR,
                   "nprobe": search_lists(nlist)}


def training_size(nlist: int) -> int:
    """Vectors to train ivf-pq on: enough for the coarse lists and for PQ's 256 centroids per sub-space."""
    return max(nlist * TRAIN_POINTS_PER_LIST, 256 * TRAIN_POINTS_PER_LIST)


def training_sample(parts: list[Path], count: int, size: int, seed: int = 0) -> np.ndarray:
    """`size` rows drawn uniformly without replacement across all parts (the same on every run)."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(count, size=min(size, count), replace=False))
    sample, offset = [], 0
    for path in parts:
        _, vectors = read_embeddings(path)
        rows = chosen[(chosen >= offset) & (chosen < offset + len(vectors))] - offset
        sample.append(vectors[rows])
        offset += len(vectors)
    return np.concatenate(sample)


def count_rows(parts: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


def build_index(emb_dir: str | Path, out: str | Path, kind: str = "flat") -> dict[str, Any]:
    """Index every part of EMB_DIR into INDEX_DIR `out`; returns index.json."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq


    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    emb_dir, out = Path(emb_dir), Path(out)
    parts, model = read_parts(emb_dir)
    count, dim = count_rows(parts), int(model["dim"])
    if count == 0:
        raise UserError(f"{emb_dir} holds parts but no embeddings (every image failed?); see its manifest.json")
    start = time.perf_counter()
    index, params = new_index(kind, dim, count)
    if not index.is_trained:
        sample = training_sample(parts, count, training_size(params["nlist"]))
        logger.info("training %s (nlist %d, %d-byte codes) on %d of %d embeddings", kind, params["nlist"],
                    params["pq_bytes"], len(sample), count)
        index.train(sample)
    tables = []
    for path in tqdm(parts, desc="index", unit="part"):
        table, vectors = read_embeddings(path)
        if vectors.shape[1] != dim:
            raise UserError(f"{path} has {vectors.shape[1]}-d embeddings, but its model says {dim}")
        index.add(vectors)
        tables.append(table)
    keys = pa.concat_tables(tables)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "index.faiss") as temp:
        faiss.write_index(index, str(temp))
    with atomic_output(out / "keys.parquet") as temp:
        pq.write_table(keys, temp)
    info = {
        "format": INDEX_FORMAT, "model": model, "dim": dim, "metric": METRIC, "kind": kind, "count": int(index.ntotal),
        **params, "parts": len(parts), "source": str(emb_dir.resolve()),
        "build_s": round(time.perf_counter() - start, 3),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / "index.json", info)
    logger.info("indexed %d embeddings (%s, dim %d) in %.1f s", info["count"], kind, dim, info["build_s"])
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("emb_dir", type=Path, help="EMB_DIR written by barlow embed")
    parser.add_argument("--out", type=Path, required=True, metavar="INDEX_DIR", help="folder for the index")
    parser.add_argument("--kind", choices=KINDS, default="flat",
                        help="flat: exact (default); ivf-pq: approximate and compact, for millions of embeddings")


def run(args: argparse.Namespace) -> int:
    info = build_index(args.emb_dir, args.out, args.kind)
    print(f"{args.out}: {info['kind']} index of {info['count']} embeddings ({info['model']['name']}, dim "
          f"{info['dim']}, cosine) built in {info['build_s']:.1f} s")
    return 0
