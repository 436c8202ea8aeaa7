"""Reading WebDataset shards: URL specs, node/worker splitting, corrupt-sample accounting and the
deterministic, resampled training stream.

URL specs are what `--data` accepts: a local tar, a folder of tars, a brace pattern, a bucket URL
(`s3://`, `gs://`, `az://`: one object, a brace pattern or a prefix holding .tar objects), `pipe:CMD`
or http(s), several joined by `::` as in webdataset. Bucket objects are streamed through fsspec
(`pipeline.storage`), which webdataset's own openers do not know.

Training reads a RESAMPLED stream: every rank draws shards with replacement and runs the same number
of steps, so uneven shards can never leave one rank waiting in a DDP collective. Batch s of an epoch is
produced by "role" s % W (W DataLoader workers); a role's stream, shuffle and per-sample augmentation
seeds are pure functions of (seed, epoch, rank, role). A run resumed at step k therefore sees exactly
the batches an uninterrupted run saw from step k on. Corrupt samples are skipped and counted; a run
stops with one sentence when more than `max_corrupt_fraction` of them are corrupt.

With `transform=None` the same stream yields raw batches instead (`EncodedBatch`: the encoded bytes,
packed, and labels): workers only read and check image headers, and `gpu_views.py` decodes and
augments the whole batch on the training device.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch
from PIL import Image

from pipeline import storage
from pipeline.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")
REMOTE_SCHEMES = ("http", "https", "hf", "ais", "sftp", "scp", "ftps")  # opened by webdataset.gopen; buckets by fsspec
MIN_SAMPLES_FOR_CHECK = 100  # the corrupt fraction is judged only after this many samples
LOGGED_CORRUPT = 20  # corrupt samples logged one by one; after that one line per LOG_EVERY
LOG_EVERY = 1000


class CorruptSample(Exception):
    """A sample whose image (or label) cannot be decoded; the message is the reason."""


# ---------------------------------------------------------------- URL specs


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or urlparse(url).scheme in REMOTE_SCHEMES


def _is_bucket(url: str) -> bool:
    return not _is_remote(url) and storage.is_url(url)


def _bucket_tars(folder: str) -> list[str]:
    """The .tar objects directly under a bucket prefix, sorted, as URLs of the folder's scheme."""
    fs, path = storage.filesystem(folder)
    with storage.errors_as_sentences(folder):
        entries = fs.ls(path, detail=True)
    prefix = folder.split("://", 1)[0]
    return sorted(f"{prefix}://{e['name']}" for e in entries if e.get("type") == "file" and e["name"].endswith(".tar"))


def _expand_bucket(spec: str) -> list[str]:
    """A bucket object, a brace pattern of objects (checked with one listing per folder), or a prefix's tars."""
    import braceexpand

    urls = list(braceexpand.braceexpand(spec))
    if len(urls) == 1 and not storage.is_file(spec):
        found = _bucket_tars(spec)  # a missing prefix or bucket raises its sentence here
        if not found:
            raise UserError(f"no .tar shards in {spec}")
        return found
    listed: dict[str, set[str]] = {}
    for url in urls:
        folder = url.rsplit("/", 1)[0]
        if folder not in listed:
            listed[folder] = set(_bucket_tars(folder))
        if url not in listed[folder]:
            raise UserError(f"shard {url} does not exist")
    return urls


def _expand_one(spec: str) -> list[str]:
    import braceexpand

    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    if _is_bucket(spec):
        return _expand_bucket(spec)
    spec = spec.removeprefix("file://").removeprefix("file:")
    path = Path(spec).expanduser()
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise UserError(f"no .tar shards in {path}")
        return urls
    urls = [str(Path(u).expanduser()) for u in braceexpand.braceexpand(spec)]
    missing = next((u for u in urls if not Path(u).is_file()), None)
    if missing is not None:
        raise UserError(f"shard {missing} does not exist")
    return urls


def expand_urls(spec: str) -> list[str]:
    """Every shard URL of a spec: local tar, folder of tars, brace pattern, bucket URL or prefix, pipe:CMD,
    http(s), joined by '::'."""
    parts = [p.strip() for p in (spec or "").split("::") if p.strip()]
    if not parts:
        raise UserError("no data given: pass shard paths, a brace pattern, a bucket prefix, pipe:CMD or http(s) URLs")
    return [url for part in parts for url in _expand_one(part)]


def read_index(spec: str) -> dict | None:
    """The `index.json` written by `barlow shards` beside local or bucket shards; None for pipe: and
    http(s) data, or when there is none.

    When the spec selects only some shards of an index, `count` and `shards` describe that selection
    (from the per-shard `counts`), so the training epoch length stays right.
    """
    urls = expand_urls(spec)
    if any(_is_remote(u) for u in urls):
        return None
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        folder, name = url.rsplit("/", 1) if storage.is_url(url) else (str(Path(url).parent), Path(url).name)
        by_dir.setdefault(folder, []).append(name)
    merged: dict | None = None
    for folder, names in by_dir.items():
        location = storage.join(folder, "index.json")
        fs, path = storage.filesystem(location)
        with storage.errors_as_sentences(location):  # unreadable or not JSON: one sentence
            try:
                index = json.loads(fs.cat_file(path))
            except FileNotFoundError:
                return None
        counts = dict(zip(index.get("shards", []), index.get("counts", [])))
        if set(names) != set(index.get("shards", [])):
            if not all(n in counts for n in names):
                return None  # shards the index does not describe: the count is unknown
            index["count"] = sum(counts[n] for n in names)
        index["shards"] = [storage.join(folder, n) for n in names]
        index["counts"] = [counts.get(n) for n in names]
        if merged is None:
            merged = index
        else:
            merged["count"] += index["count"]
            merged["shards"] += index["shards"]
            merged["counts"] += index["counts"]
            if merged.get("classes") != index.get("classes"):
                merged["classes"] = None
    return merged


def split_by_node(urls: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of the shards (for single passes such as batch embedding)."""
    return list(urls[rank::world_size])


def split_by_worker(urls: list[str]) -> list[str]:
    """This DataLoader worker's share of the shards; all of them outside a worker."""
    info = torch.utils.data.get_worker_info()
    return list(urls) if info is None else list(urls[info.id :: info.num_workers])


# ---------------------------------------------------------------- reading and decoding


class CorruptCounter:
    """Samples seen, corrupt and unlabelled, and shards that failed to read (the first one's reason kept),
    in this process: the one tally of every reader of shards."""

    def __init__(self) -> None:
        self.seen = 0
        self.corrupt = 0
        self.unlabelled = 0
        self.shard_errors = 0
        self.first_shard_error: str | None = None

    @property
    def fraction(self) -> float:
        return self.corrupt / self.seen if self.seen else 0.0

    def ok(self) -> None:
        self.seen += 1

    def add(self, seen: int, corrupt: int) -> None:
        """Fold in counts reported by another process (a DataLoader worker's batch)."""
        self.seen += seen
        self.corrupt += corrupt

    def bad(self, key: str, url: str, reason: str) -> None:
        self.seen += 1
        self.corrupt += 1
        if self.corrupt <= LOGGED_CORRUPT:
            log.warning("corrupt sample %s in %s skipped: %s", key, url, reason)
        elif self.corrupt % LOG_EVERY == 0:
            log.warning("%d corrupt samples skipped so far (of %d); latest %s in %s: %s",
                        self.corrupt, self.seen, key, url, reason)

    def shard_error(self, url: str, reason: str) -> None:
        self.shard_errors += 1
        if self.first_shard_error is None:
            self.first_shard_error = reason
        if self.shard_errors <= LOGGED_CORRUPT or self.shard_errors % LOG_EVERY == 0:
            log.warning("cannot read shard %s (%d so far): %s", url, self.shard_errors, reason)

    def check(self, max_fraction: float, min_samples: int = MIN_SAMPLES_FOR_CHECK) -> None:
        """Raise UserError once at least `min_samples` were seen and too many of them are corrupt."""
        if self.seen >= min_samples and self.fraction > max_fraction:
            raise UserError(
                f"{self.corrupt} of {self.seen} samples ({100 * self.fraction:.1f} %) are corrupt, above the "
                f"limit of {100 * max_fraction:g} % (data.max_corrupt_fraction)"
            )


def _bucket_stream(url: str, counter: CorruptCounter) -> Iterator[dict]:
    """webdataset's `url_opener` for a bucket object, which its gopen cannot open: one fsspec stream."""
    try:
        fs, path = storage.filesystem(url)
        stream = fs.open(path, "rb")
    except Exception as exc:  # the store's own error classes too: a missing object is a shard error
        counter.shard_error(url, storage.describe(exc, url))
        return
    try:
        yield {"url": url, "stream": stream}
    finally:
        stream.close()


def _shard_samples(url: str, counter: CorruptCounter) -> Iterator[dict]:
    from webdataset.tariterators import group_by_keys, tar_file_expander, tarfile_samples

    def handler(exc: Exception) -> bool:
        # webdataset appends the stream and URL to exc.args; the first argument is the message
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else (exc.args[0] if exc.args else "")
        counter.shard_error(url, f"{type(exc).__name__}: {message}")
        return True  # skip what cannot be read, keep going

    if _is_bucket(url):
        samples = group_by_keys(tar_file_expander(_bucket_stream(url, counter), handler=handler), handler=handler)
    else:
        samples = tarfile_samples([{"url": url}], handler=handler)
    errors = counter.shard_errors
    try:
        for sample in samples:
            if counter.shard_errors != errors:  # the shard broke off (truncated, vanished) while this sample was
                errors = counter.shard_errors   # being read: it may lack its image or its label; drop it
                continue
            yield sample
    finally:
        samples.close()  # stops a pipe: subprocess, closes a bucket stream, when the caller stops early


def iter_samples(urls: Iterable[str], counter: CorruptCounter) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, bytes per extension) of each URL in turn; unreadable shards
    and broken tar members are counted in `counter` and skipped."""
    for url in urls:
        yield from _shard_samples(url, counter)


def image_member(sample: dict) -> tuple[str, bytes]:
    """The sample's image member as (extension, encoded bytes), or CorruptSample saying what it has."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        members = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
        raise CorruptSample(f"no image member (has {members})")
    return ext, sample[ext]


def decode_rgb(sample: dict) -> Image.Image:
    """The sample's image as a decoded RGB PIL image, or CorruptSample with the reason."""
    ext, data = image_member(sample)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as exc:  # PIL raises many types on bad bytes; untrusted data must not stop a run
        raise CorruptSample(f"{ext}: {str(exc) or type(exc).__name__}") from None


def read_encoded(sample: dict) -> bytes:
    """The sample's encoded image bytes, once PIL has parsed their header (format and size, no pixel
    decoding), or CorruptSample with the reason. The cheap worker-side check of the raw-bytes mode."""
    ext, data = image_member(sample)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > Image.MAX_IMAGE_PIXELS:  # a decompression bomb for the GPU too
                raise CorruptSample(f"{ext}: {image.width}x{image.height} pixels is above the limit")
    except CorruptSample:
        raise
    except Exception as exc:  # PIL raises many types on bad bytes
        raise CorruptSample(f"{ext}: {str(exc) or type(exc).__name__}") from None
    return data


class EncodedBatch(NamedTuple):
    """A raw training batch: B encoded images packed in `data` (`sizes` bytes each), labels (-1: none)."""

    data: torch.Tensor  # uint8 [sum(sizes)]
    sizes: torch.Tensor  # int64 [B]
    labels: torch.Tensor  # int64 [B]
    seen: int
    corrupt: int


def pack_encoded(items: list[tuple[bytes, int]], seen: int, corrupt: int) -> EncodedBatch:
    """(bytes, label) pairs -> one EncodedBatch; one tensor of bytes crosses the worker queue cheaply."""
    data = torch.frombuffer(bytearray(b"".join(raw for raw, _ in items)), dtype=torch.uint8)
    sizes = torch.tensor([len(raw) for raw, _ in items], dtype=torch.int64)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return EncodedBatch(data, sizes, labels, seen, corrupt)


def label_of(sample: dict) -> int | None:
    """The class id from `{key}.cls`, None when the sample has no label."""
    raw = sample.get("cls")
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii").strip() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        raise CorruptSample(f"cls: {raw[:20]!r} is not an integer") from None


# ---------------------------------------------------------------- the training stream


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of ints and strings, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _resampled(urls: list[str], rng: random.Random, counter: CorruptCounter) -> Iterator[dict]:
    """Samples of shards drawn with replacement, forever; fails once every shard failed in a row."""
    distinct = set(urls)
    failed_in_a_row: set[str] = set()
    while True:
        url = rng.choice(urls)
        errors_before, produced = counter.shard_errors, 0
        for sample in _shard_samples(url, counter):
            produced += 1
            yield sample
        if produced:
            failed_in_a_row.clear()
            continue
        if counter.shard_errors == errors_before:
            counter.shard_error(url, "the shard holds no samples")
        failed_in_a_row.add(url)
        if failed_in_a_row == distinct:
            raise UserError(f"none of the {len(distinct)} shards could be read (first: {urls[0]}); see the log")


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A seeded shuffle buffer over an endless stream: fill `size`, then swap out a random slot."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = sample


class _Failure:
    """Sent from a worker instead of a batch so the main process raises one clean UserError."""

    def __init__(self, message: str) -> None:
        self.message = message


class _RoleStreams(torch.utils.data.IterableDataset):
    """Each DataLoader worker plays one role and yields that role's batches of [start_step, steps)."""

    def __init__(self, urls, *, transform, per_rank_batch, steps, start_step, epoch, seed, rank, workers,
                 shuffle_buffer, max_corrupt_fraction, min_samples) -> None:
        self.urls = list(urls)
        self.transform = transform
        self.batch = per_rank_batch
        self.steps, self.start_step = steps, start_step
        self.epoch, self.seed, self.rank = epoch, seed, rank
        self.roles = max(workers, 1)
        self.shuffle_buffer = shuffle_buffer
        self.max_corrupt_fraction = max_corrupt_fraction
        self.min_samples = min_samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        role = (worker + self.start_step) % self.roles
        try:
            yield from self._role_batches(role)
        except UserError as exc:
            yield _Failure(str(exc))

    def _role_batches(self, role: int):
        ident = (self.seed, self.epoch, self.rank, role)
        counter = CorruptCounter()
        shards = random.Random(derive_seed("shards", *ident))
        order = random.Random(derive_seed("shuffle", *ident))
        stream = _shuffled(_resampled(self.urls, shards, counter), self.shuffle_buffer, order)
        index = 0  # position in this role's sample stream: the augmentation seed of that sample
        try:
            for step in range(role, self.steps, self.roles):
                skip = step < self.start_step  # decoded (so corrupt ones count the same) but not augmented
                seen, corrupt = counter.seen, counter.corrupt
                first, second = [], []
                while len(first) < self.batch:
                    sample = next(stream)
                    index += 1
                    try:
                        if self.transform is None:  # raw bytes: header checked, decoded later on the device
                            label = label_of(sample)
                            image = (read_encoded(sample), -1 if label is None else label)
                        else:
                            image = decode_rgb(sample)
                    except CorruptSample as exc:
                        counter.bad(sample["__key__"], sample["__url__"], str(exc))
                        counter.check(self.max_corrupt_fraction, self.min_samples)
                        continue
                    counter.ok()
                    if skip:
                        first.append(None)
                        continue
                    if self.transform is None:
                        first.append(image)
                        continue
                    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone when workers=0
                        torch.default_generator.manual_seed(derive_seed("view", *ident, index))  # CPU only
                        view1, view2 = self.transform(image)
                    first.append(view1)
                    second.append(view2)
                counter.check(self.max_corrupt_fraction, self.min_samples)
                if skip:
                    continue
                if self.transform is None:
                    yield pack_encoded(first, counter.seen - seen, counter.corrupt - corrupt)
                else:
                    yield torch.stack(first), torch.stack(second), counter.seen - seen, counter.corrupt - corrupt
        finally:
            stream.close()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGTERM and SIGINT are for the trainer, not its workers.

    torchrun (and a terminal's Ctrl-C) signal the trainer's whole process group. A worker would die
    at once (torch's worker handler re-raises any SIGTERM not sent by its parent), and the trainer
    would fail on the dead worker before it could write its stop checkpoint. Ignored here, the
    workers keep feeding until the trainer checkpoints and shuts them down itself.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainLoader:
    """Iterable of exactly `steps - start_step` items (view1 [B,...], view2 [B,...], n_seen, n_corrupt),
    or `EncodedBatch`es when the stream has no transform."""

    def __init__(self, dataset: _RoleStreams, *, workers: int, pin_memory: bool) -> None:
        self.dataset = dataset
        self.workers = workers
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return max(self.dataset.steps - self.dataset.start_step, 0)

    def __iter__(self):
        if len(self) == 0:
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
            persistent_workers=False, worker_init_fn=ignore_stop_signals,
            # Its own generator: creating the loader must not advance the trainer's global torch RNG.
            generator=torch.Generator().manual_seed(derive_seed("loader", self.dataset.seed, self.dataset.epoch)),
        )
        for item in loader:
            if isinstance(item, _Failure):
                raise UserError(item.message)
            yield item


def train_loader(
    urls: list[str], *, transform: Callable | None, per_rank_batch: int, steps: int, start_step: int, epoch: int,
    seed: int, rank: int, world_size: int, workers: int, shuffle_buffer: int, max_corrupt_fraction: float,
    pin_memory: bool = False, min_samples: int = MIN_SAMPLES_FOR_CHECK,
) -> TrainLoader:
    """The deterministic, resampled training stream of one rank for steps [start_step, steps) of an epoch.

    `transform(pil_rgb) -> (view1, view2)` runs under a per-sample torch seed; `transform=None` yields
    `EncodedBatch`es (the same samples, checked but not decoded) for `gpu_views.GpuBatches`. Every rank reads all
    shards (its own draw, seeded by rank), so `world_size` only has to be checked, not split on.
    """
    if not urls:
        raise UserError("no shards to train on")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    if per_rank_batch < 1:
        raise UserError(f"the batch per rank must be at least 1, not {per_rank_batch}")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} outside [0, {steps}]")
    dataset = _RoleStreams(
        urls, transform=transform, per_rank_batch=per_rank_batch, steps=steps, start_step=start_step,
        epoch=epoch, seed=seed, rank=rank, workers=workers, shuffle_buffer=shuffle_buffer,
        max_corrupt_fraction=max_corrupt_fraction, min_samples=min_samples,
    )
    return TrainLoader(dataset, workers=workers, pin_memory=pin_memory)
