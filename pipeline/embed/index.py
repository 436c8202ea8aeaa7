"""`barlow index EMB_DIR --out INDEX_DIR [--kind flat|ivf-pq] [--update|--rebuild]`: a faiss index over
the embeddings, kept up to date as EMB_DIR changes.

Similarity is cosine: vectors are L2-normalised and compared by inner product. `flat` is exact and
the default; `ivf-pq` is for collections too large to scan, trained on a sample: an inverted file of
sqrt-N-ish lists scanned with 4-bit fast-scan product-quantisation codes (D/16 bytes), whose best
k x K_FACTOR candidates are re-ranked with 8-bit scalar-quantised vectors (D bytes). PQ codes alone
rank embeddings poorly; the re-ranking recovers most of flat's recall at about a quarter of its
memory (bench/embed_throughput.py measures both).

INDEX_DIR, a local folder or a bucket URL, holds `index.json` and generation folders `gen-<time>-<id>/`
of `index.faiss` and `keys.parquet` (row -> key, source, label, shard, part). index.json names the current
generation and records the model, dim, metric, kind, count, the EMB_DIR parts indexed
(`parts: {name: count}`) and, for ivf-pq, what it was trained on (`trained_count`, `train_residual`).
A generation is never changed once written: a run that changes the index writes a whole new one
(built in a temp folder, then renamed or uploaded), and only then replaces index.json, one small
file published whole. A reader therefore sees the old generation or the new one, never a mix, and
a run killed at any point leaves the previous index loadable. The generation before the current one
is kept for readers that read index.json just before it changed; older ones, and a killed run's,
are deleted. (Replacing fixed-name files in place could only detect a torn set, not serve the old one.)

A re-run updates: EMB_DIR's live parts (pipeline/embed/parts.py) are compared with index.json's
`parts`. The vectors of new parts are added, without retraining or re-reading the parts already
indexed; the rows of parts no longer live (superseded or pruned) are removed: from a flat index by
id, while an ivf-pq index, which cannot remove, keeps its training and gets the live vectors re-added.
ivf-pq is retrained (a full rebuild) only when its training no longer fits: the collection grew to
want more than GROWTH_LIMIT x its lists, or the new vectors lie farther from the trained lists (mean
squared residual) than RESIDUAL_LIMIT x the training sample did. Another model or --kind, or
--rebuild, rebuilds. Embeddings of different models are never mixed. faiss is imported only inside
functions, so `pipeline` imports without it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import storage
from pipeline.embed.parts import Part, check_one_model, find_parts, read_table
from pipeline.embed.search import (INDEX_FILE, INDEX_FORMAT, INDEX_JSON, KEYS_FILE, fetch_generation, load_generation,
                                   read_info)
from pipeline.errors import UserError
from pipeline.files import atomic_output
from pipeline.runtime import l2_normalize

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf-pq")
MODES = ("auto", "update", "rebuild")
METRIC = "cosine"
MIN_IVF_PQ = 10_000  # below this flat is fast anyway, and the lists would get too few training points
DEFAULT_NPROBE = 32
K_FACTOR = 128  # candidates re-ranked per wanted neighbour (bench/embed_throughput.py: recall vs latency)
TRAIN_POINTS_PER_LIST = 40  # faiss warns below 39 training points per centroid
GROWTH_LIMIT = 2.0  # retrain once the count wants more than this many times the trained lists
RESIDUAL_LIMIT = 1.25  # retrain once new vectors fit the trained lists this much worse than the sample did
IVF_FIELDS = ("nlist", "pq_bytes", "refine", "k_factor", "nprobe", "trained_count", "train_residual")  # kept by updates


def live_parts(emb_dir: str) -> tuple[list[Part], dict[str, Any]]:
    """EMB_DIR's live parts in name order and their one model; refuses an empty folder or a mix of models."""
    parts = find_parts(emb_dir)
    if parts.unreadable:  # atomic writes leave no torn part: these are foreign files or another format
        logger.warning("%s: skipping %d files that are not parts of this format (%s)", emb_dir,
                       len(parts.unreadable), ", ".join(parts.unreadable[:3]))
    if not parts.live:
        raise UserError(f"{emb_dir} holds no embeddings parts; run barlow embed MODEL_DIR --out {emb_dir} first")
    model = check_one_model(parts, None, emb_dir)
    return [parts.live[name] for name in sorted(parts.live)], model


def read_vectors(part: Part, dim: int):
    """(table of key/source/label/shard/part, float32 [N, D] unit vectors) of one part."""
    import pyarrow as pa

    table, vectors = read_table(part.location)
    if vectors.shape[1] != dim:
        raise UserError(f"{part.location} has {vectors.shape[1]}-d embeddings, but its model says {dim}")
    table = table.replace_schema_metadata(None)  # the part's footer (its sources) does not belong in keys.parquet
    return table.append_column("part", pa.array([part.name] * len(table), pa.string())), l2_normalize(vectors)


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


def training_sample(parts: list[Part], count: int, size: int, dim: int, seed: int = 0) -> np.ndarray:
    """`size` rows drawn uniformly without replacement across all parts (the same on every run)."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(count, size=min(size, count), replace=False))
    sample, offset = [], 0
    for part in parts:
        _, vectors = read_vectors(part, dim)
        rows = chosen[(chosen >= offset) & (chosen < offset + len(vectors))] - offset
        sample.append(vectors[rows])
        offset += len(vectors)
    return np.concatenate(sample)


def squared_residuals(index, vectors: np.ndarray) -> np.ndarray:
    """Squared distance of each vector to the coarse centroid of the list it goes to: what PQ encodes,
    so their mean says how well the trained lists fit the vectors."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    _, lists = ivf.quantizer.search(vectors, 1)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    return np.sum((vectors - centroids[lists[:, 0]]) ** 2, axis=1)


def add_parts(index, parts: list[Part], dim: int, measure: frozenset[str] = frozenset()):
    """Add the vectors of `parts` in order: (their rows' tables, squared residuals of the parts in `measure`)."""
    tables, residuals = [], [np.zeros(0, np.float32)]
    for part in tqdm(parts, desc="index", unit="part", disable=not parts):
        table, vectors = read_vectors(part, dim)
        if part.name in measure and len(vectors):
            residuals.append(squared_residuals(index, vectors))
        index.add(vectors)
        tables.append(table)
    return tables, np.concatenate(residuals)


def changes(indexed: dict[str, int], parts: list[Part]) -> tuple[list[Part], list[str]]:
    """(live parts not indexed yet, indexed parts no longer live). Part names are digests of their
    content, so a name that is in both holds the same rows."""
    return [p for p in parts if p.name not in indexed], sorted(set(indexed) - {p.name for p in parts})


def rebuild_reason(previous: dict[str, Any] | None, model: dict[str, Any], kind: str, mode: str,
                   out: str) -> str | None:
    """Why INDEX_DIR must be built from scratch, or None when its index can be updated."""
    if mode == "rebuild":
        return "--rebuild"
    if previous is None:
        if mode == "update":
            raise UserError(f"{out} holds no index to update; run barlow index without --update to build one")
        return "no index there yet"
    theirs = previous.get("model", {})
    if previous.get("format") != INDEX_FORMAT:
        why = f"its index is not a {INDEX_FORMAT} index"
    elif theirs.get("sha256") != model.get("sha256"):
        why = f"its index is of another model ({theirs.get('name')}, sha256 {str(theirs.get('sha256'))[:12]})"
    elif previous.get("kind") != kind:
        why = f"its index is {previous.get('kind')}, not {kind}"
    else:
        return None
    if mode == "update":
        raise UserError(f"cannot update {out}: {why}; drop --update to rebuild it")
    return why


def growth_reason(previous: dict[str, Any], count: int) -> str | None:
    wanted = ivf_lists(count)
    if wanted > GROWTH_LIMIT * previous["nlist"]:
        return (f"{count:,} embeddings want {wanted} lists, more than {GROWTH_LIMIT:g} x the {previous['nlist']} "
                "it was trained with")
    return None


def residual_reason(previous: dict[str, Any], residuals: np.ndarray) -> str | None:
    if not len(residuals):
        return None
    mean, trained = float(residuals.mean()), float(previous["train_residual"])
    if mean > RESIDUAL_LIMIT * trained:
        return (f"the new embeddings fit the trained lists worse than {RESIDUAL_LIMIT:g} x the training sample "
                f"(mean squared residual {mean:.4g} vs {trained:.4g}): their distribution shifted")
    return None


def read_previous(out: str) -> dict[str, Any] | None:
    """INDEX_DIR's index.json, None when there is none; {} when it cannot be used (a rebuild replaces it)."""
    if not storage.exists(storage.join(out, INDEX_JSON)):
        return None
    try:
        return read_info(out)
    except UserError as exc:
        logger.info("%s", exc)
        return {}


def rebuild(parts: list[Part], kind: str, dim: int, count: int):
    """A fresh index of every live part: (index, row tables, index.json fields)."""
    index, params = new_index(kind, dim, count)
    if not index.is_trained:
        sample = training_sample(parts, count, training_size(params["nlist"]), dim)
        logger.info("training %s (nlist %d, %d-byte codes) on %d of %d embeddings", kind, params["nlist"],
                    params["pq_bytes"], len(sample), count)
        index.train(sample)
        params.update(trained_count=len(sample), train_residual=float(squared_residuals(index, sample).mean()))
    tables, _ = add_parts(index, parts, dim)
    return index, tables, params


def update(previous: dict[str, Any], parts: list[Part], new: list[Part], gone: list[str], out: str):
    """The previous index brought up to date: (index, row tables, what was done), or (None, None, why it
    must be rebuilt instead)."""
    import faiss
    import pyarrow as pa
    import pyarrow.compute as pc

    kind, dim = previous["kind"], int(previous["dim"])
    if kind == "ivf-pq" and (why := growth_reason(previous, sum(p.count for p in parts))):
        return None, None, f"retraining: {why}"
    try:
        index, keys = load_generation(fetch_generation(out, previous), previous, out)
    except UserError as exc:
        return None, None, f"the current index cannot be read ({exc})"
    dropped = pc.is_in(keys["part"], value_set=pa.array(gone, pa.string())).to_numpy(zero_copy_only=False)
    removed, adding = int(dropped.sum()), new
    if removed and kind == "ivf-pq":  # IndexRefine cannot remove: keep the trained lists, re-add what is live
        index.reset()
        keys, adding = keys.slice(0, 0), parts
    elif removed:  # remove_ids renumbers the remaining rows in order, so the keys filter alike
        index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(dropped).astype(np.int64)))
        keys = keys.filter(pa.array(~dropped))
    fresh = frozenset(p.name for p in new)
    tables, residuals = add_parts(index, adding, dim, fresh if kind == "ivf-pq" else frozenset())
    if kind == "ivf-pq" and (why := residual_reason(previous, residuals)):
        return None, None, f"retraining: {why}"
    done = {"action": "update", "added": sum(len(t) for p, t in zip(adding, tables) if p.name in fresh),
            "removed": removed, "parts_added": sorted(fresh), "parts_removed": gone, "retrained": False}
    if kind == "ivf-pq":
        readded = f"re-added {int(index.ntotal):,} embeddings to drop {removed:,}; " if adding is parts else ""
        done["reason"] = readded + "training kept"
        if len(residuals):
            done["reason"] += f" (new embeddings' mean squared residual {residuals.mean():.4g}, " \
                              f"training sample's {previous['train_residual']:.4g})"
    return index, [keys, *tables], done


def new_generation() -> str:
    """A fresh generation folder name: sorts by time, and a random tail so that no two runs share one."""
    return f"gen-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def save(index, keys, generation: str, work: Path) -> None:
    import faiss
    import pyarrow.parquet as pq

    folder = work / generation
    with atomic_output(folder / INDEX_FILE) as temp:  # fsynced before index.json can name them
        faiss.write_index(index, str(temp))
    with atomic_output(folder / KEYS_FILE) as temp:
        pq.write_table(keys, temp)


def publish(work: Path, out: str, info: dict[str, Any]) -> None:
    """The new generation into INDEX_DIR, then index.json naming it: the one step that switches readers."""
    generation = info["generation"]
    if storage.is_url(out):
        storage.publish_folder(work / generation, storage.join(out, generation))
    else:
        os.replace(work / generation, storage.local_path(out) / generation)
    storage.write_json(storage.join(out, INDEX_JSON), info)


def remove_stale(out: str, keep: set[str | None]) -> None:
    """Delete generations other than `keep` (killed runs', superseded ones) and a format-1 index's files."""
    fs, path = storage.filesystem(out)
    try:
        with storage.errors_as_sentences(out):
            for entry in fs.ls(path, detail=False):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if (name.startswith(("gen-", ".index-")) and name not in keep) or name in (INDEX_FILE, KEYS_FILE):
                    fs.rm(entry, recursive=True)
    except UserError as exc:  # the new index is published; leftovers only cost space
        logger.warning("could not delete old generations: %s", exc)


def work_folder(out: str) -> Path:
    """Where the new generation is built: inside INDEX_DIR on disk (so publishing is a rename), else a temp folder."""
    if storage.is_url(out):
        return Path(tempfile.mkdtemp(prefix="barlow-index-"))
    storage.make_dirs(out)
    return Path(tempfile.mkdtemp(prefix=".index-", dir=storage.local_path(out)))


def make_index(previous: dict[str, Any] | None, parts: list[Part], model: dict[str, Any], kind: str,
               why: str | None, out: str):
    """(index, row tables, ivf-pq parameters, what was done): the previous index updated when `why` is None
    and its training still fits, else a fresh one."""
    if why is None:
        new, gone = changes(previous["parts"], parts)
        index, tables, done = update(previous, parts, new, gone, out)
        if index is not None:
            return index, tables, {k: previous[k] for k in IVF_FIELDS if k in previous}, done
        why = done
    count = sum(p.count for p in parts)
    if count == 0:
        raise UserError(f"{out}: the parts hold no embeddings (every image failed?); see EMB_DIR's manifest.json")
    logger.info("building the %s index of %d embeddings (%s)", kind, count, why)
    index, tables, params = rebuild(parts, kind, int(model["dim"]), count)
    return index, tables, params, {"action": "rebuild", "added": int(index.ntotal), "removed": 0,
                                   "retrained": kind == "ivf-pq", "reason": why}


def build_index(emb_dir: str | Path, out: str | Path, kind: str | None = None, mode: str = "auto") -> dict[str, Any]:
    """Index EMB_DIR's live parts into INDEX_DIR `out`, updating the index already there when it can
    (mode "auto"), only updating ("update") or always rebuilding ("rebuild"); returns index.json, whose
    `last_run` says what was done. `kind` None: the existing index's kind, else flat."""
    import pyarrow as pa

    emb_dir, out = str(emb_dir), str(out)
    storage.check_writable(out)
    start = time.perf_counter()
    parts, model = live_parts(emb_dir)
    previous = read_previous(out)
    kind = kind or (previous or {}).get("kind") or "flat"
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    why = rebuild_reason(previous, model, kind, mode, out)
    if why is None and changes(previous["parts"], parts) == ([], []):
        remove_stale(out, {previous["generation"], previous.get("previous_generation")})
        info = {**previous, "last_run": {"action": "none", "added": 0, "removed": 0, "retrained": False}}
        logger.info("%s", describe(info))
        return info
    work = work_folder(out)
    try:
        index, tables, params, done = make_index(previous, parts, model, kind, why, out)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        info = {
            "format": INDEX_FORMAT, "model": model, "dim": int(model["dim"]), "metric": METRIC, "kind": kind,
            "count": int(index.ntotal), **params, "generation": new_generation(),
            "previous_generation": (previous or {}).get("generation"), "parts": {p.name: p.count for p in parts},
            "source": emb_dir if storage.is_url(emb_dir) else str(storage.local_path(emb_dir).resolve()),
            "created": previous["created"] if done["action"] == "update" else now, "updated": now,
            "build_s": round(time.perf_counter() - start, 3), "last_run": done,
        }
        # promote: a generation written before the shard column gets nulls there
        save(index, pa.concat_tables(tables, promote_options="default"), info["generation"], work)
        publish(work, out, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    remove_stale(out, {info["generation"], info["previous_generation"]})
    logger.info("%s", describe(info))
    return info


def describe(info: dict[str, Any]) -> str:
    """One line on what the last run did."""
    done = info["last_run"]
    what = {"none": "up to date", "update": "updated", "rebuild": "built"}[done["action"]]
    line = (f"{what}: {info['kind']} index of {info['count']:,} embeddings ({info['model']['name']}, dim "
            f"{info['dim']}, cosine)")
    if done["action"] == "update":
        line += (f"; added {done['added']:,} embeddings of {plural(len(done['parts_added']), 'new part')}, removed "
                 f"{done['removed']:,} of {plural(len(done['parts_removed']), 'part')} no longer live")
    if done.get("reason"):
        line += f"; {done['reason']}"
    return line


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("emb_dir", help="EMB_DIR written by barlow embed (a folder or bucket URL)")
    parser.add_argument("--out", required=True, metavar="INDEX_DIR", help="folder or bucket URL for the index")
    parser.add_argument("--kind", choices=KINDS, default=None,
                        help="flat: exact; ivf-pq: approximate and compact, for millions of embeddings "
                             "(default: the existing index's kind, else flat)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--update", dest="mode", action="store_const", const="update", default="auto",
                      help="only update the index in INDEX_DIR (refused when there is none, or of another model "
                           "or kind); by default a re-run updates when it can and rebuilds otherwise")
    mode.add_argument("--rebuild", dest="mode", action="store_const", const="rebuild",
                      help="build from scratch even when the index in INDEX_DIR could be updated")


def run(args: argparse.Namespace) -> int:
    info = build_index(args.emb_dir, args.out, args.kind, args.mode)
    print(f"{args.out}: {describe(info)} in {info.get('build_s', 0):.1f} s")
    return 0
