"""`barlow embed MODEL_DIR --data URLS --out EMB_DIR`: embed whole image buckets, resumably.

One input shard -> one `part-<shard stem>.parquet` (key, source, label or null, embedding as a
float32 list of D). A part is written under a temp name, fsynced and renamed, so it is complete or
absent; a re-run skips complete parts and redoes the rest, which makes a run killed at any moment
(kill -9, preemption) end, once re-run, with every key exactly once. `--part-of i/n` takes the
deterministic share `shards[i::n]`, so n pods of an Indexed Job cover every shard exactly once.

DataLoader workers read and decode shards (one shard per worker at a time) while the main process
runs ONNX Runtime, so the model is never waiting on JPEG decoding. Preprocessing is
`pipeline.data.preprocess.load_array`, the function /embed uses, and embeddings are L2-normalised as
/embed returns them by default: the batch and the served embedding of the same bytes agree.
Undecodable images are skipped and listed with their reason; a shard that cannot be read (network,
truncated tar) gets no part, so a re-run retries it, and the command exits non-zero.

Each part carries its own metadata (model, shard, counts, failures) in the parquet footer;
`manifest.json` is rebuilt from the parts after every run, so pods sharing one EMB_DIR never need to
coordinate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.preprocess import DEFAULT_MAX_PIXELS, BadImage, load_array
from pipeline.data.shards import unique_key
from pipeline.data.stream import (IMAGE_EXTENSIONS, CorruptCounter, CorruptSample, expand_urls, image_member,
                                  iter_samples, label_of, read_index, split_by_node, split_by_worker)
from pipeline.devices import RUNTIME_DEVICES
from pipeline.errors import UserError
from pipeline.files import atomic_output, remove_stale_temps, write_json

logger = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "barlow-embed/embeddings/1"
META_KEY = b"barlow"  # parquet footer key holding a part's JSON metadata
FILES_PER_PART = 10_000  # image folders and path lists are cut into parts of this many files
DEFAULT_BATCH = 128
MAX_WORKERS = 16
LIST_SUFFIXES = (".txt", ".lst", ".list")


# ---------------------------------------------------------------- inputs: shards and their parts


@dataclass(frozen=True)
class Shard:
    """One unit of work: a tar URL, or a slice of an image folder / path list (`files`: (key, path))."""

    stem: str
    url: str
    files: tuple[tuple[str, str], ...] | None = None

    @property
    def part_name(self) -> str:
        return f"part-{self.stem}.parquet"


def shard_stem(url: str) -> str:
    """`dir/shard-000001.tar` and `pipe:aws s3 cp s3://b/shard-000001.tar -` -> `shard-000001`."""
    words = [w for w in url.removeprefix("pipe:").split() if ".tar" in w] or [url]
    name = words[-1].rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return safe_name(name)


def safe_name(name: str) -> str:
    """A file-name-safe stem: letters, digits, '-', '_' and inner dots."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "shard"


def unique_stems(urls: list[str]) -> list[str]:
    """Stems, with a short hash of the URL added where two URLs share one (train/ and test/ shards)."""
    stems = [shard_stem(u) for u in urls]
    clashes = {s for s in stems if stems.count(s) > 1}
    return [f"{s}-{hashlib.sha1(u.encode(), usedforsecurity=False).hexdigest()[:8]}" if s in clashes else s
            for s, u in zip(stems, urls)]  # sha1 names a file here; it protects nothing


def _file_shards(paths: list[tuple[Path, Path]], name: str, per_part: int) -> list[Shard]:
    """(path, relative) pairs, keyed and cut into parts of `per_part` in the given (sorted) order."""
    used: set[str] = set()
    keyed = [(unique_key(relative, used), str(path)) for path, relative in paths]
    return [Shard(f"{safe_name(name)}-{i // per_part:06d}", f"{name}[{i}:{i + per_part}]", tuple(keyed[i:i + per_part]))
            for i in range(0, len(keyed), per_part)]


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not path.name.startswith(".")


def resolve_shards(spec: str, per_part: int = FILES_PER_PART) -> list[Shard]:
    """Every shard of `--data`, in a deterministic order: tar URLs as in training (local, brace
    patterns, pipe:, http(s)), a plain image folder, or a text file with one image path a line."""
    path = Path(spec).expanduser() if spec and "::" not in spec else None  # pipe: and http(s) are no paths
    if path is not None and path.is_dir() and not any(path.glob("*.tar")):
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_file(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"{path} holds neither .tar shards nor images ({', '.join(IMAGE_EXTENSIONS)})")
        return _file_shards([(p, p.relative_to(path)) for p in files], path.resolve().name or "images", per_part)
    if path is not None and path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        try:
            lines = [line.strip() for line in path.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read the list of images {path}: {exc}") from None
        entries = [Path(line).expanduser() for line in lines if line and not line.startswith("#")]
        if not entries:
            raise UserError(f"{path} lists no image paths")
        base = path.parent.resolve()
        entries = [p if p.is_absolute() else base / p for p in entries]  # relative to the list file
        # Keys from the path below the list's folder, else the whole path.
        return _file_shards([(p, p.relative_to(base) if p.is_relative_to(base) else Path(*p.parts[1:]))
                             for p in entries], path.stem, per_part)
    urls = expand_urls(spec)
    if len(set(urls)) != len(urls):
        raise UserError("--data names the same shard more than once")
    return [Shard(stem, url) for stem, url in zip(unique_stems(urls), urls)]


def parse_part_of(value: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """`i/n` from --part-of, else JOB_COMPLETION_INDEX / JOB_COMPLETIONS (Kubernetes Indexed Job), else 0/1."""
    env = os.environ if env is None else env
    if not value:
        index = env.get("JOB_COMPLETION_INDEX", "").strip()
        if not index:
            return 0, 1
        total = env.get("JOB_COMPLETIONS", "").strip()
        if not total:
            raise UserError("JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not; set it to the Job's "
                            "completions or pass --part-of i/n")
        value, source = f"{index}/{total}", "JOB_COMPLETION_INDEX/JOB_COMPLETIONS"
    else:
        source = "--part-of"
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UserError(f"{source} must look like i/n (e.g. 0/4), not {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"{source} {value} is outside 0 <= i < n")
    return i, n


def share(shards: list[Shard], index: int, count: int) -> list[Shard]:
    """This pod's disjoint, deterministic share; the n shares together are all shards."""
    return split_by_node(shards, index, count)


# ---------------------------------------------------------------- decoding (DataLoader workers)


@dataclass
class Batch:
    """Decoded images of one shard; `last` closes the shard, `error` says why it could not be read."""

    stem: str
    keys: list[str]
    sources: list[str]
    labels: list[int | None]
    images: torch.Tensor  # uint8 [B, 3, S, S]; a tensor so it crosses the worker queue in shared memory
    failures: list[dict[str, str]] = field(default_factory=list)
    last: bool = False
    error: str | None = None


def _source_of(sample: dict, url: str) -> str:
    """The original image's source from `{key}.json` (written by barlow shards), else the shard URL."""
    raw = sample.get("json")
    if raw:
        try:
            source = json.loads(raw).get("source")
            if isinstance(source, str) and source:
                return source
        except (ValueError, AttributeError):
            pass
    return url


def _tar_items(shard: Shard, counter: CorruptCounter) -> Iterator[tuple[str, str, int | None, bytes | Exception]]:
    for sample in iter_samples([shard.url], counter):
        key = sample["__key__"]
        try:
            _, data = image_member(sample)
            label = label_of(sample)
        except CorruptSample as exc:
            yield key, shard.url, None, exc
            continue
        yield key, _source_of(sample, shard.url), label, data


def _file_items(shard: Shard) -> Iterator[tuple[str, str, int | None, bytes | Exception]]:
    for key, path in shard.files or ():
        try:
            yield key, path, None, Path(path).read_bytes()
        except OSError as exc:
            yield key, path, None, CorruptSample(f"cannot read the file: {exc.strerror or exc}")


def shard_batches(shard: Shard, size: int, batch_size: int, max_pixels: int) -> Iterator[Batch]:
    """Decoded batches of one shard; the last one has `last=True` (and `error` if reading failed)."""
    counter = CorruptCounter()
    items = _file_items(shard) if shard.files is not None else _tar_items(shard, counter)
    keys, sources, labels, arrays, failures = [], [], [], [], []

    def batch(last: bool = False) -> Batch:
        images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return Batch(shard.stem, list(keys), list(sources), list(labels), images, list(failures), last,
                     counter.first_shard_error if last else None)

    for key, source, label, data in items:
        try:
            if isinstance(data, Exception):
                raise data
            array = load_array(data, size, max_pixels)
        except (BadImage, CorruptSample) as exc:
            failures.append({"key": key, "source": source, "reason": str(exc)})
            continue
        keys.append(key)
        sources.append(source)
        labels.append(label)
        arrays.append(array)
        if len(arrays) == batch_size:
            yield batch()
            keys, sources, labels, arrays, failures = [], [], [], [], []
    yield batch(last=True)


class ShardStream(torch.utils.data.IterableDataset):
    """Each DataLoader worker decodes its own shards (`shards[worker::workers]`), one at a time."""

    def __init__(self, shards: list[Shard], size: int, batch_size: int, max_pixels: int) -> None:
        self.shards, self.size, self.batch_size, self.max_pixels = shards, size, batch_size, max_pixels

    def __iter__(self) -> Iterator[Batch]:
        for shard in split_by_worker(self.shards):
            yield from shard_batches(shard, self.size, self.batch_size, self.max_pixels)


# ---------------------------------------------------------------- parts and the manifest


def model_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What makes two embeddings comparable: the exact ONNX graph (its sha256), plus name and dim."""
    return {"name": info["name"], "sha256": info.get("onnx_sha256", ""), "dim": int(info["dim"]),
            "image_size": int(info["image_size"])}


def part_schema(dim: int, meta: dict[str, Any] | None = None):
    import pyarrow as pa

    schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("label", pa.int32()),
                        ("embedding", pa.list_(pa.float32(), dim))])
    return schema.with_metadata({META_KEY: json.dumps(meta).encode()}) if meta is not None else schema


def write_part(path: Path, keys: list[str], sources: list[str], labels: list[int | None], embeddings: np.ndarray,
               meta: dict[str, Any]) -> None:
    """One part, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = int(meta["model"]["dim"])
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(len(keys), dim)
    schema = part_schema(dim, meta)
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    table = pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array(sources, pa.string()), pa.array(labels, pa.int32()),
         pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema)
    with atomic_output(path) as temp, open(temp, "wb") as file:
        pq.write_table(table, file)


def read_part_meta(path: Path) -> dict[str, Any] | None:
    """A part's footer metadata, or None when the file is not a readable part of this format."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        meta = json.loads(metadata[META_KEY])
    except Exception:  # a torn or foreign file: treated as absent and redone
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == EMBEDDINGS_FORMAT else None


def existing_parts(out: Path) -> dict[str, dict[str, Any]]:
    """part file name -> metadata for every readable part in EMB_DIR."""
    found = {}
    for path in sorted(out.glob("part-*.parquet")):
        meta = read_part_meta(path)
        if meta is None:
            logger.warning("%s is not a readable part; it will be redone if it is in this run's share", path)
            continue
        found[path.name] = meta
    return found


def check_same_model(parts: dict[str, dict[str, Any]], model: dict[str, Any], out: Path) -> None:
    for name, meta in parts.items():
        theirs = meta.get("model", {})
        if theirs.get("sha256") != model["sha256"]:
            raise UserError(
                f"{out} holds embeddings of another model ({name}: {theirs.get('name')}, sha256 "
                f"{str(theirs.get('sha256'))[:12]}) than {model['name']} (sha256 {model['sha256'][:12]}); "
                "embed into a new --out folder")


def write_manifest(out: Path, model: dict[str, Any], data: str, run: dict[str, Any], normalized: bool) -> dict:
    """manifest.json from every part on disk plus this run's numbers (merged with other pods' runs)."""
    parts = existing_parts(out)
    previous: dict[str, Any] = {}
    try:
        previous = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    runs = previous.get("runs", {}) if isinstance(previous.get("runs"), dict) else {}
    if run["shards"] > run["skipped"] or run["part_of"] not in runs:  # a re-run with nothing to do keeps the numbers
        runs[run["part_of"]] = run
    failures = [f for meta in parts.values() for f in meta.get("failures", [])]
    manifest = {
        "format": EMBEDDINGS_FORMAT,
        "model": model,
        "normalized": normalized,
        "data": data,
        "count": sum(meta["count"] for meta in parts.values()),
        "failed": len(failures),
        "parts": [{"part": name, "shard": meta["shard"], "count": meta["count"], "failed": len(meta["failures"])}
                  for name, meta in parts.items()],
        "failures": failures,
        "unreadable_shards": run["unreadable_shards"],
        "runs": runs,
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------- the run


@dataclass
class _OpenPart:
    """Rows of one shard gathered so far (a shard's batches arrive in order from one worker)."""

    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)


def _expected_counts(spec: str, shards: list[Shard]) -> int | None:
    """Images in these shards according to the shards' index.json (for the progress bar), if known."""
    if any(s.files is not None for s in shards):
        return sum(len(s.files or ()) for s in shards)
    try:
        index = read_index(spec)
    except UserError:
        return None
    if not index or None in index.get("counts", [None]):
        return None
    counts = dict(zip(index["shards"], index["counts"]))
    wanted = [counts.get(s.url) for s in shards]
    return None if None in wanted else sum(wanted)


def embed(model_dir: str | Path, data: str, out: str | Path, *, batch_size: int = DEFAULT_BATCH,
          workers: int | None = None, device: str = "auto", part_of: tuple[int, int] = (0, 1),
          normalize: bool = True, threads: int = 0, files_per_part: int = FILES_PER_PART,
          max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Embed this share of the shards of `data` into EMB_DIR `out`; returns the manifest.

    Raises UserError (after writing every part it could) when some shards could not be read.
    """
    from pipeline.runtime import load_model_info

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if max_pixels < 1:
        raise UserError(f"--max-pixels must be at least 1, not {max_pixels}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    model = model_identity(load_model_info(Path(model_dir)))
    shards = resolve_shards(data, files_per_part)
    stems = [s.stem for s in shards]
    if len(set(stems)) != len(stems):
        raise UserError("two inputs would write the same part; give each shard a distinct name")
    mine = share(shards, *part_of)
    out.mkdir(parents=True, exist_ok=True)
    done = existing_parts(out)
    check_same_model(done, model, out)
    todo = [s for s in mine if s.part_name not in done]
    for shard in todo:  # temp files of a killed run of this share; other shares' are not ours to touch
        remove_stale_temps(out / shard.part_name)
    logger.info("share %d/%d: %d of %d shards, %d already embedded, %d to do", part_of[0], part_of[1], len(mine),
                len(shards), len(mine) - len(todo), len(todo))

    stats = _embed_shards(todo, Path(model_dir), out, model, data, batch_size=batch_size, workers=workers,
                          device=device, threads=threads, normalize=normalize, max_pixels=max_pixels) if todo else _Stats()
    run = {"part_of": f"{part_of[0]}/{part_of[1]}", "shards": len(mine), "skipped": len(mine) - len(todo),
           "written": len(stats.written), "images": stats.images, "failed": stats.failed,
           "unreadable_shards": stats.unreadable, "duration_s": round(stats.seconds, 3),
           "startup_s": round(stats.startup_s, 3), "images_per_s": round(stats.images_per_s, 2),
           "batch_size": batch_size, "workers": stats.workers, "providers": stats.providers}
    manifest = write_manifest(out, model, data, run, normalize)
    logger.info("embedded %d images into %d parts (%d skipped as undecodable) in %.1f s, %.1f images/s",
                stats.images, len(stats.written), stats.failed, stats.seconds, stats.images_per_s)
    if stats.unreadable:
        first = stats.unreadable[0]
        raise UserError(f"{len(stats.unreadable)} of {len(todo)} shards could not be read (first: {first['shard']}: "
                        f"{first['reason']}); their parts were not written; run the same command again to retry")
    return manifest


@dataclass
class _Stats:
    """What one run did; images/s is the steady rate, after the first batch (session load, worker start)."""

    images: int = 0
    failed: int = 0
    written: list[str] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    workers: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0
    steady_images: int = 0
    steady_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        if self.steady_images and self.steady_seconds > 0:
            return self.steady_images / self.steady_seconds
        return self.images / self.seconds if self.images and self.seconds > 0 else 0.0


def _embed_shards(todo: list[Shard], model_dir: Path, out: Path, model: dict[str, Any], data: str, *,
                  batch_size: int, workers: int | None, device: str, threads: int, normalize: bool,
                  max_pixels: int) -> _Stats:
    """Decode in DataLoader workers, embed in this process, write each shard's part when it closes."""
    from pipeline.runtime import OnnxModel, l2_normalize, usable_cpus

    start = time.perf_counter()
    stats = _Stats()
    workers = min(usable_cpus(), MAX_WORKERS) if workers is None else workers
    stats.workers = max(0, min(workers, len(todo)))
    stream = ShardStream(todo, model["image_size"], batch_size, max_pixels)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=stats.workers,
                                         prefetch_factor=4 if stats.workers else None)
    # Workers fork here, before ONNX Runtime starts its threads (and CUDA), and decode while it loads.
    batches = iter(loader)
    encoder = OnnxModel(model_dir, device, threads, batch_size)
    stats.providers = encoder.providers
    by_stem = {s.stem: s for s in todo}
    open_parts: dict[str, _OpenPart] = {}
    steady_since = None
    progress = tqdm(total=_expected_counts(data, todo), desc="embed", unit="img", dynamic_ncols=True)
    try:
        for batch in batches:
            part = open_parts.setdefault(batch.stem, _OpenPart())
            if batch.keys:
                vectors = encoder(batch.images.numpy())
                part.embeddings.append(l2_normalize(vectors) if normalize else vectors)
                part.keys += batch.keys
                part.sources += batch.sources
                part.labels += batch.labels
            part.failures += batch.failures
            stats.images += len(batch.keys)
            stats.failed += len(batch.failures)
            if steady_since is None:
                steady_since = time.perf_counter()
                stats.startup_s = steady_since - start
            else:
                stats.steady_images += len(batch.keys)
            progress.update(len(batch.keys) + len(batch.failures))
            if not batch.last:
                continue
            del open_parts[batch.stem]
            shard = by_stem[batch.stem]
            if batch.error is not None:
                stats.unreadable.append({"shard": shard.url, "reason": batch.error})
                continue
            _finish_part(out, shard, part, model, normalize)
            stats.written.append(shard.part_name)
    finally:
        progress.close()
    stats.seconds = time.perf_counter() - start
    stats.steady_seconds = time.perf_counter() - steady_since if steady_since is not None else 0.0
    return stats


def _finish_part(out: Path, shard: Shard, part: _OpenPart, model: dict[str, Any], normalize: bool) -> None:
    dim = model["dim"]
    embeddings = np.concatenate(part.embeddings) if part.embeddings else np.zeros((0, dim), np.float32)
    meta = {"format": EMBEDDINGS_FORMAT, "model": model, "normalized": normalize, "shard": shard.url,
            "count": len(part.keys), "failures": part.failures}
    write_part(out / shard.part_name, part.keys, part.sources, part.labels, embeddings, meta)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="MODEL_DIR written by barlow export")
    parser.add_argument("--data", required=True, metavar="URLS",
                        help="shards as in training (path, folder of .tar, brace pattern, pipe:CMD, http(s); '::' "
                             "joins several), a plain image folder, or a .txt file with one image path a line")
    parser.add_argument("--out", required=True, type=Path, metavar="EMB_DIR",
                        help="folder for the parts and manifest.json")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="images per inference (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"decoding processes (default: usable CPUs, at most {MAX_WORKERS}; 0: decode in the "
                             "main process)")
    parser.add_argument("--device", default="auto", choices=RUNTIME_DEVICES,
                        help="ONNX Runtime device (default %(default)s: CUDA when a GPU is visible)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="skip (and list) images with more pixels than this (default %(default)s)")
    parser.add_argument("--part-of", metavar="i/n", default=None,
                        help="embed only share i of n (default: JOB_COMPLETION_INDEX/JOB_COMPLETIONS, else 0/1)")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="store raw backbone features instead of L2-normalised ones")


def run(args: argparse.Namespace) -> int:
    part_of = parse_part_of(args.part_of)
    manifest = embed(args.model_dir, args.data, args.out, batch_size=args.batch_size, workers=args.workers,
                     device=args.device, part_of=part_of, normalize=args.normalize, max_pixels=args.max_pixels)
    this = manifest["runs"][f"{part_of[0]}/{part_of[1]}"]
    print(f"{args.out}: {this['written']} parts written, {this['skipped']} already done; {this['images']} images "
          f"embedded at {this['images_per_s']:.1f} images/s, {this['failed']} undecodable (listed in manifest.json); "
          f"{manifest['count']} embeddings in {len(manifest['parts'])} parts in total")
    return 0
