"""`barlow embed MODEL_DIR --data SRC --out EMB_DIR`: embed whole image buckets, incrementally.

SRC is WebDataset shards (local, bucket or http; brace patterns, prefixes), a folder or bucket prefix
of image objects (recursive; an image extension, or none and an image inside), or a .txt/.csv/.parquet
list of image URLs or paths. EMB_DIR, a folder or a bucket prefix, holds immutable parts
(`pipeline.embed.parts`): each records the sources it embedded with their identity (ETag, generation
or size + mtime). A run lists SRC, compares identities with the live parts and embeds only what is
new or changed; sources that disappeared are reported, and removed with --prune. A part is published
whole (rename, or one upload), and a superseding part names what it replaces, so a run killed at any
moment ends, once re-run, with every source exactly once; names are never trusted.

`--part-of i/n` (or an Indexed Job's JOB_COMPLETION_INDEX) gives each pod a deterministic share that
does not depend on what other pods have already written: the i-th of every n listed shards or new
images, and the parts whose names hash to i. Each pod writes its own run record
(`runs/part-of-i-n.json`); `manifest.json` is a summary rebuilt from the parts.

DataLoader workers fetch (a bounded number of objects in flight per worker) and decode while the main
process runs ONNX Runtime. Preprocessing is `pipeline.data.preprocess.load_array`, the one /embed
uses, and embeddings are L2-normalised as /embed returns them: batch and served embeddings agree.
An undecodable or vanished image is skipped and listed; a shard that cannot be read gets no part,
so a re-run retries it, and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import storage
from pipeline.data.preprocess import DEFAULT_MAX_PIXELS, BadImage, load_array
from pipeline.data.shards import unique_key
from pipeline.data.stream import (IMAGE_EXTENSIONS, CorruptCounter, CorruptSample, expand_urls, image_member,
                                  iter_samples, label_of, read_index, split_by_worker)
from pipeline.devices import RUNTIME_DEVICES
from pipeline.embed.parts import (TAR_SUFFIXES, Parts, check_one_model, find_parts, new_meta, part_name, read_meta,
                                  read_table, stored_keys, write_part)
from pipeline.errors import UserError
from pipeline.files import remove_stale_temps

logger = logging.getLogger(__name__)

FILES_PER_PART = 10_000  # image objects are grouped into parts of this many
DEFAULT_BATCH = 128
MAX_WORKERS = 16
DEFAULT_FETCHES = 16  # objects in flight per decoding worker: hides per-object latency of buckets
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv", ".parquet")
LIST_COLUMNS = ("url", "path", "key", "source", "image")
NOT_IMAGES = {"json", "txt", "csv", "parquet", "cls", "tar", "md", "html", "xml", "yaml", "yml", "gz", "zip", "pt",
              "onnx", "npy", "log"}  # known other files beside images: ignored (and counted) without a fetch


# ---------------------------------------------------------------- listing SRC


@dataclass(frozen=True)
class Source:
    """One input as listed: its URL (or local path), identity, and for an image object its row key."""

    url: str
    identity: str | None
    key: str | None = None  # None for a tar shard: its samples carry their keys
    relative: str | None = None  # an image object's path below SRC, which its key is made from


@dataclass
class Listing:
    """What SRC holds now: tar shards or image objects, plus what was left out and why."""

    tar: bool
    sources: list[Source]
    ignored: int = 0  # files beside the images that are not images by extension
    missing: list[str] = field(default_factory=list)  # list entries that do not exist


def _extension(url: str) -> str:
    name = storage.name_of(url)
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _is_candidate(url: str) -> bool:
    """An image by extension, or with no extension (decoding decides: a sniff, not a guess by name)."""
    name = storage.name_of(url)
    ext = _extension(url)
    return not name.startswith(".") and (ext in IMAGE_EXTENSIONS or ext == "" or ext not in NOT_IMAGES and len(ext) > 5)


def _keyed(pairs: list[tuple[str, str, str | None]]) -> list[Source]:
    """(url, relative path, identity) -> Sources with unique row keys, in the given (sorted) order."""
    used: set[str] = set()
    return [Source(url, identity, unique_key(PurePosixPath(relative), used), relative)
            for url, relative, identity in pairs]


def keep_stored_keys(listing: Listing, stored: dict[str, str]) -> Listing:
    """A source EMB_DIR already holds keeps its key; a new one gets a key no stored source has, so an
    added `cat.jpeg` never takes the key of the stored `cat.jpg`."""
    if listing.tar or not stored:
        return listing
    used = set(stored.values())
    sources = [replace(s, key=stored[s.url]) if s.url in stored else s for s in listing.sources]
    sources = [s if s.url in stored else replace(s, key=unique_key(PurePosixPath(s.relative or s.url), used))
               for s in sources]
    return replace(listing, sources=sources)


def _list_folder(spec: str) -> Listing:
    files = storage.list_files(spec)
    base = storage.filesystem(spec)[1].rstrip("/")
    pairs, ignored = [], 0
    for url, entry in files.items():
        relative = str(entry["name"])[len(base) + 1:]
        if url.endswith("/") or any(part.startswith(".") for part in PurePosixPath(relative).parts):  # "dir/" markers
            continue
        if _is_candidate(url):
            pairs.append((url, relative, storage.identity(entry)))
        else:
            ignored += 1
    if not pairs:
        raise UserError(f"{spec} holds neither .tar shards nor images ({', '.join(IMAGE_EXTENSIONS)})")
    return Listing(False, _keyed(pairs), ignored)


def _list_entries(spec: str) -> list[str]:
    """The entries of a .txt/.csv/.parquet list of image URLs or paths."""
    ext = _extension(spec)
    if ext == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(spec)))
        except Exception as exc:
            raise UserError(f"cannot read the list of images {spec}: {exc}") from None
        column = next((c for c in LIST_COLUMNS if c in table.column_names), None)
        if column is None:
            raise UserError(f"{spec} has none of the columns {', '.join(LIST_COLUMNS)}")
        return [str(v) for v in table.column(column).to_pylist() if v]
    text = storage.read_text(spec)
    if ext == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        column = next((header.index(c) for c in LIST_COLUMNS if c in header), None)
        rows = rows[1:] if column is not None else rows
        return [row[column or 0].strip() for row in rows if row and row[column or 0].strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _list_file_list(spec: str) -> Listing:
    entries = _list_entries(spec)
    if not entries:
        raise UserError(f"{spec} lists no images")
    base = spec.rsplit("/", 1)[0] if storage.is_url(spec) else str(storage.local_path(spec).resolve().parent)
    resolved = []
    for entry in entries:  # relative entries are relative to the list's folder
        url = entry if storage.is_url(entry) or entry.startswith("/") else storage.join(base, entry)
        relative = url[len(base) + 1:] if url.startswith(base + "/") else url.split("://", 1)[-1].lstrip("/")
        resolved.append((url, relative))
    identities = _identities([url for url, _ in resolved])
    missing = [url for url, _ in resolved if url not in identities]
    pairs = [(url, relative, identities[url]) for url, relative in resolved if url in identities]
    return Listing(False, _keyed(pairs), missing=missing)


def _identities(urls: list[str]) -> dict[str, str | None]:
    """url -> identity for the URLs that exist (concurrently: one metadata request each)."""
    def one(url: str) -> tuple[str, str | None] | None:
        try:
            fs, path = storage.filesystem(url)
            return url, storage.identity(fs.info(path))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise UserError(storage.describe(exc, url)) from None

    with ThreadPoolExecutor(DEFAULT_FETCHES) as pool:
        return dict(found for found in pool.map(one, urls) if found is not None)


def _list_shards(spec: str) -> Listing:
    urls = expand_urls(spec)
    if len(set(urls)) != len(urls):
        raise UserError("--data names the same shard more than once")
    known = _identities([u for u in urls if not u.startswith("pipe:")])
    return Listing(True, [Source(u, known.get(u)) for u in urls])


def list_sources(spec: str) -> Listing:
    """Everything `--data` names now, sorted, with identities."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError("no data given: pass shards, a folder or bucket prefix of images, or a list of images")
    single = "::" not in spec and not spec.startswith("pipe:") and "{" not in spec
    if single and _extension(spec) in {s.lstrip(".") for s in LIST_SUFFIXES} and storage.is_file(spec):
        return _list_file_list(spec)
    if single and not spec.endswith((".tar", ".tgz", ".tar.gz")) and storage.scheme(spec) not in storage.READ_ONLY \
            and storage.is_dir(spec):
        fs, path = storage.filesystem(spec)
        if not fs.glob(f"{path.rstrip('/')}/*.tar"):
            return _list_folder(spec)
    return _list_shards(spec)


# ---------------------------------------------------------------- planning: what to embed, who does it


@dataclass(frozen=True)
class Unit:
    """One part to write: sources to read now, plus the rows of a live part it supersedes that are kept."""

    name: str  # the part file it writes
    stem: str
    tar: bool
    sources: tuple[Source, ...]
    covers: tuple[tuple[str, str | None], ...]  # every source of the new part, with identity
    carry: str | None = None  # location of the live part whose other rows are kept
    drop: frozenset[str] = frozenset()  # its sources not kept (changed, or pruned)
    replaces: tuple[str, ...] = ()


@dataclass
class Plan:
    """This share's work, and what the comparison with EMB_DIR found (over all shares)."""

    units: list[Unit]
    deletions: list[str]  # live parts whose every source was pruned (this share's)
    new: int
    changed: int
    unchanged: int
    gone: list[str]


def owner_of(name: str, count: int) -> int:
    """The share that owns an existing part: a hash of its name, stable whatever else is written."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % count


def safe_name(name: str) -> str:
    """A file-name-safe stem: letters, digits, '-', '_' and inner dots."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")[:60] or "part"


def shard_stem(url: str) -> str:
    """`dir/shard-000001.tar` and `pipe:aws s3 cp s3://b/shard-000001.tar -` -> `shard-000001`."""
    words = [w for w in url.removeprefix("pipe:").split() if ".tar" in w] or [url]
    name = storage.name_of(words[-1])
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return safe_name(name)


def shard_home(url: str) -> str:
    """A tar unit's one shard as its rows record it (the member is the row's key): where a thumbnail reads the
    image later, from another working directory, so a local shard's path is made absolute."""
    if storage.is_url(url) or url.startswith("pipe:"):
        return url
    return str(storage.local_path(url).resolve())


def _unit(stem: str, tar: bool, read: list[Source], model_sha: str, carry=None, kept=None, replaces=()) -> Unit:
    covers = dict(kept or {})
    covers.update({s.url: s.identity for s in read})
    drop = frozenset(carry.sources) - frozenset(kept or {}) if carry is not None else frozenset()
    return Unit(part_name(stem, covers, model_sha), stem, tar, tuple(read), tuple(sorted(covers.items())),
                carry.location if carry else None, drop, tuple(sorted(set(replaces))))


def make_plan(listing: Listing, parts: Parts, model_sha: str, share: tuple[int, int], prune: bool,
              per_part: int = FILES_PER_PART) -> Plan:
    """Compare the listing with the live parts; this share's units (see the module docstring)."""
    index, count = share
    owner = parts.owner()
    listed = {s.url: s for s in listing.sources}
    changed = {u for u, s in listed.items() if u in owner and parts.live[owner[u]].sources[u] != s.identity}
    new = [s for s in listing.sources if s.url not in owner]
    gone = sorted(set(owner) - set(listed))
    units: list[Unit] = []
    deletions: list[str] = []
    # Existing parts touched by a change (or a prune): superseded by one new part, by their owner.
    stale = changed | (set(gone) if prune else set())
    for name in sorted({owner[u] for u in stale}):
        if owner_of(name, count) != index:
            continue
        part = parts.live[name]
        drop = {u for u in part.sources if u in stale}
        kept = {u: i for u, i in part.sources.items() if u not in drop}
        read = [listed[u] for u in sorted(drop) if u in listed]
        if not kept and not read:
            deletions.append(part.location)
            continue
        stem = part.meta.get("unit") or "part"
        replaces = [name, *part.meta.get("replaces", [])]
        units.append(_unit(stem, listing.tar, read, model_sha, part if kept else None, kept, replaces)
                     if kept else _unit(stem, listing.tar, read, model_sha, replaces=replaces))
    # New sources: the i-th of every n in listing order (stable: the listing does not depend on EMB_DIR).
    position = {s.url: i for i, s in enumerate(listing.sources)}
    mine = [s for s in new if position[s.url] % count == index]
    if listing.tar:
        units += [_unit(shard_stem(s.url), True, [s], model_sha) for s in mine]
    else:
        for start in range(0, len(mine), per_part):
            group = mine[start:start + per_part]
            units.append(_unit(safe_name(group[0].key or "images"), False, group, model_sha))
    return Plan(units, deletions, len(new), len(changed), len(listed) - len(new) - len(changed), gone)


# ---------------------------------------------------------------- fetching and decoding (DataLoader workers)


@dataclass
class Batch:
    """Decoded images of one unit; `last` closes the unit, `error` says why a shard could not be read."""

    unit: str
    keys: list[str]
    sources: list[str]
    labels: list[int | None]
    images: torch.Tensor  # uint8 [B, 3, S, S]; a tensor so it crosses the worker queue in shared memory
    failures: list[dict[str, str]] = field(default_factory=list)
    fetched: int = 0
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


Item = tuple[str, str, "int | None", "bytes | Exception"]  # key, source, label, image bytes or why there are none


def _tar_items(url: str, counter: CorruptCounter) -> Iterator[Item]:
    for sample in iter_samples([url], counter):
        key = sample["__key__"]
        try:
            _, data = image_member(sample)
            label = label_of(sample)
        except CorruptSample as exc:
            yield key, url, None, exc
            continue
        yield key, _source_of(sample, url), label, data


def fetch(url: str) -> bytes | Exception:
    """An object's bytes, or the reason it has none (vanished, refused) as an exception to list."""
    try:
        if not storage.is_url(url):
            return storage.local_path(url).read_bytes()
        fs, path = storage.filesystem(url)
        return fs.cat_file(path, max_concurrency=1) if storage.scheme(url) == "s3" else fs.cat_file(path)  # no HEAD
    except FileNotFoundError:
        return CorruptSample("vanished during the run")
    except Exception as exc:  # a store's own error classes: listed as the reason, the run goes on
        return CorruptSample(storage.describe(exc, url))


def bounded_map(function: Callable, items: Iterable, in_flight: int) -> Iterator:
    """function(item) for each item, in order, at most `in_flight` running at once in threads."""
    with ThreadPoolExecutor(max(1, in_flight)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True)
class Piece:
    """A slice of a unit's sources for one decoding worker: a part of 10,000 images is fetched by all
    workers at once, and the main process writes it when its last piece closes."""

    unit: Unit
    sources: tuple[Source, ...]


def pieces_of(units: list[Unit], size: int) -> list[Piece]:
    """Image units cut into pieces of `size` sources; a tar shard (read as one stream) is one piece."""
    pieces = []
    for unit in units:
        if unit.tar or not unit.sources:
            pieces.append(Piece(unit, unit.sources))
        else:
            pieces += [Piece(unit, unit.sources[i:i + size]) for i in range(0, len(unit.sources), size)]
    return pieces


def piece_batches(piece: Piece, size: int, batch_size: int, max_pixels: int, fetches: int) -> Iterator[Batch]:
    """Fetched and decoded batches of one piece; the last one has `last=True` (and `error` if a shard failed)."""
    counter = CorruptCounter()
    if piece.unit.tar:
        items: Iterator[Item] = (item for s in piece.sources for item in _tar_items(s.url, counter))
        decoded = ((k, src, lab, _decode(data, size, max_pixels)) for k, src, lab, data in items)
    else:
        def fetch_decode(source: Source):
            return source.key, source.url, None, _decode(fetch(source.url), size, max_pixels)

        decoded = bounded_map(fetch_decode, piece.sources, fetches)  # decoding in threads too: PIL drops the GIL
    keys, sources, labels, arrays, failures = [], [], [], [], []
    fetched = 0

    def batch(last: bool = False) -> Batch:
        images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return Batch(piece.unit.name, list(keys), list(sources), list(labels), images, list(failures), fetched, last,
                     counter.first_shard_error if last else None)

    for key, source, label, result in decoded:
        fetched += 1
        if isinstance(result, Exception):
            failures.append({"key": key, "source": source, "reason": str(result)})
            continue
        keys.append(key)
        sources.append(source)
        labels.append(label)
        arrays.append(result)
        if len(arrays) == batch_size:
            yield batch()
            keys, sources, labels, arrays, failures, fetched = [], [], [], [], [], 0
    yield batch(last=True)


def _decode(data: bytes | Exception, size: int, max_pixels: int) -> np.ndarray | Exception:
    if isinstance(data, Exception):
        return data
    try:
        return load_array(data, size, max_pixels)
    except BadImage as exc:
        return exc


class PieceStream(torch.utils.data.IterableDataset):
    """Each DataLoader worker fetches and decodes its own pieces (`pieces[worker::workers]`), one at a time."""

    def __init__(self, pieces: list[Piece], size: int, batch_size: int, max_pixels: int, fetches: int) -> None:
        self.pieces, self.size, self.batch_size, self.max_pixels, self.fetches = pieces, size, batch_size, max_pixels, fetches

    def __iter__(self) -> Iterator[Batch]:
        for piece in split_by_worker(self.pieces):
            yield from piece_batches(piece, self.size, self.batch_size, self.max_pixels, self.fetches)


# ---------------------------------------------------------------- model identity, summary records


def model_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What makes two embeddings comparable: the exact ONNX graph (its sha256), plus name and dim."""
    return {"name": info["name"], "sha256": info.get("onnx_sha256", ""), "dim": int(info["dim"]),
            "image_size": int(info["image_size"])}


def run_record_location(out: str, share: tuple[int, int]) -> str:
    """Each share's own record of its last run: parallel pods never write the same file."""
    return storage.join(out, "runs", f"part-of-{share[0]}-{share[1]}.json")


def write_manifest(out: str, data: str, listing: Listing | None = None, plan: Plan | None = None) -> dict[str, Any]:
    """manifest.json: a summary of the live parts (the record) and of the runs' own files."""
    parts = find_parts(out)
    model = check_one_model(parts, None, out)
    failures = [f for part in parts.live.values() for f in part.meta.get("failures", [])]
    runs = {}
    fs, path = storage.filesystem(storage.join(out, "runs"))
    if fs.exists(path):
        for name in sorted(fs.glob(f"{path.rstrip('/')}/part-of-*.json")):
            try:
                runs[name.rsplit("/", 1)[-1].removesuffix(".json")] = json.loads(fs.cat_file(name))
            except (OSError, ValueError):
                continue
    manifest = {
        "format": "barlow-embed/manifest/2",
        "model": model,
        "normalized": next((p.meta.get("normalized") for p in parts.live.values()), True),
        "data": data,
        "count": sum(p.count for p in parts.live.values()),
        "sources": sum(len(p.sources) for p in parts.live.values()),
        "failed": len(failures),
        "parts": [{"part": p.name, "unit": p.meta.get("unit"), "count": p.count, "sources": len(p.sources),
                   "failed": len(p.meta.get("failures", []))} for p in parts.live.values()],
        "failures": failures,
        "superseded_awaiting_deletion": parts.dead,
        "unreadable_files": parts.unreadable,
        "runs": runs,
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if listing is not None and plan is not None:
        manifest["disappeared"] = plan.gone[:1000]
        manifest["disappeared_count"] = len(plan.gone)
        manifest["missing_from_list"] = listing.missing[:1000]
        manifest["ignored_not_images"] = listing.ignored
    storage.write_json(storage.join(out, "manifest.json"), manifest)
    return manifest


# ---------------------------------------------------------------- the run


@dataclass
class _Stats:
    """What one run did; images/s is the steady rate, after the first batch (session load, worker start)."""

    images: int = 0
    failed: int = 0
    fetched: int = 0
    written: list[str] = field(default_factory=list)
    deleted: int = 0
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


def _expected_images(data: str, units: list[Unit]) -> int | None:
    """Images to fetch (for the progress bar): counted for image objects, from index.json for shards."""
    if not any(u.tar for u in units):
        return sum(len(u.sources) for u in units)
    try:
        index = read_index(data)
    except UserError:
        return None
    if not index or None in index.get("counts", [None]):
        return None
    counts = dict(zip(index["shards"], index["counts"]))
    wanted = [counts.get(s.url) for u in units for s in u.sources]
    return None if None in wanted else sum(wanted)


def remove_parts(locations: Iterable[str]) -> int:
    count = 0
    for location in locations:
        storage.remove(location)
        count += 1
    return count


def embed(model_dir: str, data: str, out: str, *, batch_size: int = DEFAULT_BATCH,
          workers: int | None = None, device: str = "auto", part_of: tuple[int, int] = (0, 1),
          normalize: bool = True, threads: int = 0, files_per_part: int = FILES_PER_PART,
          max_pixels: int = DEFAULT_MAX_PIXELS, prune: bool = False, fetches: int = DEFAULT_FETCHES) -> dict[str, Any]:
    """Embed what is new or changed in `data` (this share of it) into EMB_DIR `out`; returns the manifest.

    Raises UserError (after writing every part it could) when some shards could not be read.
    """
    from pipeline.runtime import load_model_info, resolve_model_dir

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if max_pixels < 1:
        raise UserError(f"--max-pixels must be at least 1, not {max_pixels}")
    if fetches < 1:
        raise UserError(f"--fetches must be at least 1, not {fetches}")
    out, data = str(out), str(data)
    storage.check_writable(out)
    if not storage.is_url(out) and storage.local_path(out).exists() and not storage.local_path(out).is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    model_dir = resolve_model_dir(model_dir)  # once: every part of this run comes from one version
    model = model_identity(load_model_info(model_dir))
    listing = list_sources(data)
    storage.make_dirs(out)
    parts = find_parts(out)
    check_one_model(parts, model, out)
    remove_parts(storage.join(out, name) for name in parts.dead)  # superseded by a complete part: a killed run's leftovers
    listing = keep_stored_keys(listing, stored_keys(parts) if not listing.tar else {})
    plan = make_plan(listing, parts, model["sha256"], part_of, prune, files_per_part)
    if not storage.is_url(out):  # temp files of a killed run of this share; other shares' are not ours to touch
        for unit in plan.units:
            remove_stale_temps(storage.local_path(storage.join(out, unit.name)))
    logger.info("share %d/%d: %d sources listed: %d new, %d changed, %d unchanged, %d disappeared%s; %d parts to "
                "write", part_of[0], part_of[1], len(listing.sources), plan.new, plan.changed, plan.unchanged,
                len(plan.gone), " (pruned)" if prune else "", len(plan.units))
    stats = _Stats()
    if plan.units:
        stats = _embed_units(plan.units, model_dir, out, model, data, listing, batch_size=batch_size,
                             workers=workers, device=device, threads=threads, normalize=normalize,
                             max_pixels=max_pixels, fetches=fetches)
    stats.deleted = remove_parts(plan.deletions)
    run = {"part_of": f"{part_of[0]}/{part_of[1]}", "listed": len(listing.sources), "new": plan.new,
           "changed": plan.changed, "unchanged": plan.unchanged, "disappeared": len(plan.gone), "pruned": prune,
           "parts_written": len(stats.written), "parts_deleted": stats.deleted, "images": stats.images,
           "failed": stats.failed, "unreadable_shards": stats.unreadable, "duration_s": round(stats.seconds, 3),
           "startup_s": round(stats.startup_s, 3), "images_per_s": round(stats.images_per_s, 2),
           "batch_size": batch_size, "workers": stats.workers, "providers": stats.providers,
           "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    storage.write_json(run_record_location(out, part_of), run)
    manifest = write_manifest(out, data, listing, plan)
    manifest["this_run"] = run
    logger.info("embedded %d images into %d parts (%d skipped as undecodable) in %.1f s, %.1f images/s",
                stats.images, len(stats.written), stats.failed, stats.seconds, stats.images_per_s)
    if stats.unreadable:
        first = stats.unreadable[0]
        raise UserError(f"{len(stats.unreadable)} of {len(plan.units)} shards could not be read (first: "
                        f"{first['shard']}: {first['reason']}); their parts were not written; run the same command "
                        "again to retry")
    return manifest


@dataclass
class _OpenPart:
    """Rows of one unit gathered so far (a unit's batches arrive in order from one worker)."""

    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None  # why a shard of this unit could not be read: no part is written


def _embed_units(units: list[Unit], model_dir: Path, out: str, model: dict[str, Any], data: str, listing: Listing, *,
                 batch_size: int, workers: int | None, device: str, threads: int, normalize: bool,
                 max_pixels: int, fetches: int) -> _Stats:
    """Fetch and decode in DataLoader workers, embed in this process, write each unit's part when it closes."""
    from pipeline.runtime import OnnxModel, l2_normalize, usable_cpus

    start = time.perf_counter()
    stats = _Stats()
    workers = min(usable_cpus(), MAX_WORKERS) if workers is None else workers
    images = sum(len(u.sources) for u in units if not u.tar)
    pieces = pieces_of(units, max(1, min(batch_size, math.ceil(images / max(workers, 1)))))  # every worker busy
    stats.workers = max(0, min(workers, len(pieces)))
    stream = PieceStream(pieces, model["image_size"], batch_size, max_pixels, fetches)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=stats.workers,
                                         prefetch_factor=4 if stats.workers else None)
    # Workers fork here, before ONNX Runtime starts its threads (and CUDA), and decode while it loads.
    batches = iter(loader)
    encoder = OnnxModel(Path(model_dir), device, threads, batch_size)
    stats.providers = encoder.providers
    by_name = {u.name: u for u in units}
    pieces_left = Counter(p.unit.name for p in pieces)
    open_parts: dict[str, _OpenPart] = {}
    steady_since = None
    progress = tqdm(total=_expected_images(data, units), desc="embed", unit="img", dynamic_ncols=True)
    progress.set_postfix(listed=len(listing.sources), fetched=0, embedded=0)
    try:
        for batch in batches:
            part = open_parts.setdefault(batch.unit, _OpenPart())
            if batch.keys:
                vectors = encoder(batch.images.numpy())
                part.embeddings.append(l2_normalize(vectors) if normalize else vectors)
                part.keys += batch.keys
                part.sources += batch.sources
                part.labels += batch.labels
            part.failures += batch.failures
            stats.images += len(batch.keys)
            stats.failed += len(batch.failures)
            stats.fetched += batch.fetched
            if steady_since is None:
                steady_since = time.perf_counter()
                stats.startup_s = steady_since - start
            else:
                stats.steady_images += len(batch.keys)
            progress.update(len(batch.keys) + len(batch.failures))
            progress.set_postfix(listed=len(listing.sources), fetched=stats.fetched, embedded=stats.images,
                                 refresh=False)
            unit = by_name[batch.unit]
            if batch.error is not None:
                part.error = batch.error
                stats.unreadable.append({"shard": unit.sources[0].url if unit.sources else unit.name,
                                         "reason": batch.error})
            if not batch.last:
                continue
            pieces_left[batch.unit] -= 1
            if pieces_left[batch.unit]:
                continue
            del open_parts[batch.unit]
            if part.error is not None:
                continue
            _finish_part(out, unit, part, model, normalize)
            stats.written.append(unit.name)
            remove_parts(storage.join(out, name) for name in unit.replaces)
    finally:
        progress.close()
    stats.seconds = time.perf_counter() - start
    stats.steady_seconds = time.perf_counter() - steady_since if steady_since is not None else 0.0
    return stats


def _finish_part(out: str, unit: Unit, part: _OpenPart, model: dict[str, Any], normalize: bool) -> None:
    """Write the unit's part: its new rows plus the kept rows of the part it supersedes."""
    dim = model["dim"]
    embeddings = [np.concatenate(part.embeddings)] if part.embeddings else []
    keys, sources, labels, failures = part.keys, part.sources, part.labels, part.failures
    if not unit.tar and embeddings:  # pieces arrive from several workers: rows in listing order
        position = {s.url: i for i, s in enumerate(unit.sources)}
        order = sorted(range(len(keys)), key=lambda i: position[sources[i]])
        keys, sources, labels = [keys[i] for i in order], [sources[i] for i in order], [labels[i] for i in order]
        embeddings = [embeddings[0][order]]
    shards = [shard_home(unit.sources[0].url) if unit.tar and unit.sources else None] * len(keys)
    if unit.carry is not None:
        old = read_meta(unit.carry) or {}
        table, vectors = read_table(unit.carry)
        keep = np.array([s not in unit.drop for s in table.column("source").to_pylist()], dtype=bool)
        kept = table.filter(keep).to_pydict()
        keys, sources, labels = kept["key"] + keys, kept["source"] + sources, kept["label"] + labels
        shards = kept["shard"] + shards
        embeddings.insert(0, vectors[keep])
        failures = [f for f in old.get("failures", []) if f.get("source") not in unit.drop] + failures
    vectors = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    failed_vanished = {f["source"] for f in part.failures if f.get("reason") == "vanished during the run"}
    covers = {u: i for u, i in unit.covers if u not in failed_vanished}
    meta = new_meta(model, normalize, unit.stem, covers, len(keys), failures, list(unit.replaces))
    write_part(storage.join(out, unit.name), keys, sources, labels, vectors, meta, shards)


# ---------------------------------------------------------------- CLI


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="MODEL_DIR written by barlow export (a folder or a bucket URL)")
    parser.add_argument("--data", required=True, metavar="SRC",
                        help="WebDataset shards (path, folder, bucket prefix, brace pattern, http(s), pipe:CMD; '::' "
                             "joins several), a folder or bucket prefix of images (recursive), or a .txt/.csv/.parquet "
                             "list of image URLs or paths")
    parser.add_argument("--out", required=True, metavar="EMB_DIR",
                        help="folder or bucket prefix for the parts and manifest.json")
    parser.add_argument("--prune", action="store_true",
                        help="remove the embeddings of sources that are no longer in --data (else only reported)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help="images per inference (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"decoding processes (default: usable CPUs, at most {MAX_WORKERS}; 0: decode in the "
                             "main process)")
    parser.add_argument("--fetches", type=int, default=DEFAULT_FETCHES,
                        help="objects each decoding process fetches at once (default %(default)s)")
    parser.add_argument("--device", default="auto", choices=RUNTIME_DEVICES,
                        help="ONNX Runtime device (default %(default)s: CUDA when a GPU is visible)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="skip (and list) images with more pixels than this (default %(default)s)")
    parser.add_argument("--part-of", metavar="i/n", default=None,
                        help="embed only share i of n (default: JOB_COMPLETION_INDEX/JOB_COMPLETIONS, else 0/1)")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="store raw backbone features instead of L2-normalised ones")


def summary(out: str, manifest: dict[str, Any]) -> str:
    """The run in two lines: what the comparison found, what was done, and what EMB_DIR now holds."""
    run = manifest["this_run"]
    gone = run["disappeared"]
    gone_text = (f"{gone} disappeared (" + ("removed" if run["pruned"] else "kept; --prune removes them") + ")"
                 if gone else "0 disappeared")
    return (f"{out}: {run['listed']} sources listed: {run['new']} new, {run['changed']} changed, {run['unchanged']} "
            f"unchanged, {gone_text}\n"
            f"{run['images']} images embedded at {run['images_per_s']:.1f} images/s into {run['parts_written']} parts, "
            f"{run['failed']} skipped (listed in manifest.json); EMB_DIR holds {manifest['count']} embeddings in "
            f"{len(manifest['parts'])} parts")


def run(args: argparse.Namespace) -> int:
    part_of = parse_part_of(args.part_of)
    manifest = embed(args.model_dir, args.data, args.out, batch_size=args.batch_size, workers=args.workers,
                     device=args.device, part_of=part_of, normalize=args.normalize, max_pixels=args.max_pixels,
                     prune=args.prune, fetches=args.fetches)
    print(summary(args.out, manifest))
    return 0
