"""`barlow shards`: turn an image folder or Fashion-MNIST into WebDataset tar shards.

Training streams shards sequentially instead of opening millions of small files, which is what keeps
GPUs fed from network storage. Each sample is `{key}.jpg` (original JPEG bytes, never re-encoded) or
`{key}.png` (lossless sources), `{key}.cls` (class id) when labelled and `{key}.json` (source, size,
label name). `index.json` beside the shards records counts, classes and every skipped file, so a bad
file is reported, never fatal. The walk is sorted: the same input always gives the same shards.

SRC and DIR may be bucket URLs (`s3://`, `gs://`, `az://`; `pipeline.storage`). Each shard is written
to a temp file and published whole (renamed on a disk, one upload to a bucket), index.json last, so a
reader never sees a torn shard, nor an index.json naming shards that are not there yet.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePath, PurePosixPath

from PIL import Image
from tqdm import tqdm

from pipeline import storage
from pipeline.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from pipeline.errors import UserError

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
DEFAULT_PER_SHARD = 5000
JPEG_FORMATS = {"JPEG", "MPO"}  # MPO: multi-picture JPEG from phone cameras, still a plain JPEG to decoders
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}  # modes PNG stores without conversion
READ_THREADS, READ_AHEAD = 16, 64  # source files read in parallel: a bucket takes tens of ms per object


@dataclass
class Sample:
    """One image ready to be written: encoded bytes plus what goes into `{key}.json`."""

    key: str
    ext: str  # "jpg" or "png"
    data: bytes
    width: int
    height: int
    source: str
    label: int | None = None


# ---------------------------------------------------------------- Fashion-MNIST


def _fashion_mnist_samples(split: str, limit: int | None) -> tuple[Iterator[Sample], int, list[str]]:
    images, labels = read_fashion_mnist(split)
    count = len(images) if limit is None else min(limit, len(images))

    def samples() -> Iterator[Sample]:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray(images[i]).save(buffer, format="PNG")  # uint8 [28, 28]: grayscale
            yield Sample(
                key=f"{i:06d}", ext="png", data=buffer.getvalue(), width=28, height=28,
                source=f"fashion-mnist:{split}/{i}", label=int(labels[i]),
            )

    return samples(), count, list(FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------- image folders


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file under root, relative, in sorted order (the shard order)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink cycle: each real folder once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if _visible(d))
        base = Path(folder).relative_to(root)
        found.extend(base / f for f in sorted(files) if _visible(f))
    return found


def _bucket_walk(root: str) -> list[PurePosixPath]:
    """Every non-hidden object under a bucket prefix, relative, in `_walk`'s order (a folder's files
    before its sub-folders'), so a bucket and its copy on a disk give the same shards."""
    base = storage.filesystem(root)[1].rstrip("/") + "/"
    paths = (storage.filesystem(url)[1] for url in storage.list_files(root))
    found = [PurePosixPath(p[len(base):]) for p in paths if p.startswith(base)]
    found = [f for f in found if all(_visible(part) for part in f.parts)]
    return sorted(found, key=lambda f: [(1, d) for d in f.parts[:-1]] + [(0, f.name)])


def sample_key(relative: PurePath) -> str:
    """A WebDataset key from a relative path: no extension, no dots (webdataset splits keys at the
    first dot), only [A-Za-z0-9_-] inside each component, components joined by '/'."""
    parts = list(relative.with_suffix("").parts)
    cleaned = [re.sub(r"[^A-Za-z0-9_-]+", "_", p).strip("_") or "_" for p in parts]
    return "/".join(cleaned)


def unique_key(relative: PurePath, used: set[str]) -> str:
    """`sample_key` of a relative path, with _2, _3... added until it is not in `used` (then added to it)."""
    key = sample_key(relative)
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}_{n}"
    used.add(candidate)
    return candidate


def _skip_reason(exc: Exception) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a readable image"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _read(location: str) -> bytes | Exception:
    """A source file's bytes, or the exception that says why it cannot be read (raised by the caller)."""
    try:
        if not storage.is_url(location):
            return Path(location).read_bytes()
        fs, path = storage.filesystem(location)
        return fs.cat_file(path)
    except Exception as exc:  # the store's own error classes too: a file skipped, never a stopped run
        return UserError(storage.describe(exc, location)) if storage.is_url(location) else exc


def _read_all(locations: list[str]) -> Iterator[bytes | Exception]:
    """`_read` of each location, in order, READ_AHEAD at a time in threads."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(locations), READ_AHEAD):
            yield from pool.map(_read, locations[start : start + READ_AHEAD])


def encode_image(data: bytes) -> tuple[str, bytes, int, int]:
    """(ext, bytes, width, height): JPEG bytes as they are, anything else losslessly as PNG.

    The image is fully decoded either way, so truncated or garbage files fail here, not in training.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        width, height = image.size
        if image.format in JPEG_FORMATS:
            return "jpg", data, width, height
        if image.format == "PNG":
            return "png", data, width, height
        if image.mode not in PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "png", buffer.getvalue(), width, height


def _folder_samples(
    root: str, limit: int | None, skipped: list[dict]
) -> tuple[Iterator[Sample], int, list[str] | None]:
    """Samples of a local folder or a bucket prefix (`root`: a resolved path or a URL)."""
    bucket = storage.is_url(root)
    files: list[PurePath] = list(_bucket_walk(root) if bucket else _walk(Path(root)))

    def location(relative: PurePath) -> str:
        return storage.join(root, *relative.parts) if bucket else str(Path(root) / relative)

    labelled = any(len(f.parts) > 1 for f in files)
    classes = sorted({f.parts[0] for f in files if len(f.parts) > 1}) if labelled else None
    class_ids = {name: i for i, name in enumerate(classes or [])}
    if labelled:
        loose = [f for f in files if len(f.parts) == 1]
        skipped.extend({"source": location(f), "reason": "not inside a class folder"} for f in loose)
        files = [f for f in files if len(f.parts) > 1]
    if not files:
        raise UserError(f"no files found in {root}")
    if limit is not None:
        files = files[:limit]

    def samples() -> Iterator[Sample]:
        used: set[str] = set()
        for relative, data in zip(files, _read_all([location(f) for f in files])):
            source = location(relative)
            try:
                if isinstance(data, Exception):
                    raise data
                ext, data, width, height = encode_image(data)
            except Exception as exc:  # PIL raises many types on bad input; a bad file must never stop the run
                reason = _skip_reason(exc)
                log.warning("skipping %s: %s", source, reason)
                skipped.append({"source": source, "reason": reason})
                continue
            yield Sample(
                key=unique_key(relative, used), ext=ext, data=data, width=width, height=height,
                source=source, label=class_ids[relative.parts[0]] if labelled else None,
            )

    return samples(), len(files), classes


# ---------------------------------------------------------------- writing


def _existing_outputs(out: str) -> list[str]:
    """index.json (first: removed first, it must never name missing shards), then the shards in `out`."""
    fs, path = storage.filesystem(out)
    with storage.errors_as_sentences(out):
        try:
            listed = fs.ls(path, detail=False)
        except FileNotFoundError:  # nothing there yet (a missing bucket shows on the first upload)
            listed = []
    names = sorted(storage.name_of(n) for n in listed)
    return [storage.join(out, n) for n in names if n == "index.json"] + \
        [storage.join(out, n) for n in names if fnmatch(n, "shard-*.tar")]


def _prepare_out(out: str, overwrite: bool) -> None:
    storage.check_writable(out)
    folder = None if storage.is_url(out) else storage.local_path(out)
    if folder is not None and folder.exists() and not folder.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    existing = _existing_outputs(out)
    if existing and not overwrite:
        raise UserError(f"{out} already holds shards; pass --overwrite to replace them or choose another --out")
    for location in existing:
        storage.remove(location)
    storage.make_dirs(out)


def _record(sample: Sample, classes: list[str] | None) -> dict:
    meta = {"source": sample.source, "width": sample.width, "height": sample.height}
    record = {"__key__": sample.key, sample.ext: sample.data}
    if sample.label is not None:
        record["cls"] = str(sample.label).encode()
        meta["label"] = classes[sample.label]
    record["json"] = json.dumps(meta).encode()
    return record


def write_shards(
    src: str, out: str | Path, per_shard: int = DEFAULT_PER_SHARD, limit: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `shard-%06d.tar` and `index.json` into `out` (a folder or bucket prefix) from SRC; return the index."""
    import webdataset as wds

    if per_shard < 1:
        raise UserError(f"--per-shard must be at least 1, not {per_shard}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    out = str(out)
    skipped: list[dict] = []
    if src.startswith("fashion-mnist:"):
        samples, total, classes = _fashion_mnist_samples(src.partition(":")[2], limit)
        source = src
    elif storage.is_url(src):
        samples, total, classes = _folder_samples(src.rstrip("/"), limit, skipped)
        source = src.rstrip("/")
    else:
        root = Path(src).expanduser()
        if not root.is_dir():
            raise UserError(f"{src} is not a folder, a bucket prefix, fashion-mnist:train or fashion-mnist:test")
        source = str(root.resolve())
        samples, total, classes = _folder_samples(source, limit, skipped)
    _prepare_out(out, overwrite)

    shards: list[str] = []
    counts: list[int] = []
    stream = iter(tqdm(samples, total=total, desc="shards", unit="img"))
    sample = next(stream, None)
    while sample is not None or not shards:  # one shard even when every file was skipped
        shards.append(SHARD_PATTERN % len(shards))
        counts.append(0)
        # mtime fixed and PAX headers: reproducible tars that hold keys of any length.
        with storage.output(storage.join(out, shards[-1])) as temp, open(temp, "wb") as file, \
                wds.TarWriter(file, mtime=0, format="PAX_FORMAT") as writer:
            while sample is not None and counts[-1] < per_shard:
                writer.write(_record(sample, classes))
                counts[-1] += 1
                sample = next(stream, None)
    index = {
        "count": sum(counts), "shards": shards, "counts": counts,
        "classes": classes, "source": source, "per_shard": per_shard, "skipped": skipped,
    }
    storage.write_json(storage.join(out, "index.json"), index)
    return index


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC", help="image folder or bucket prefix (sub-folder = class), "
                                                   "fashion-mnist:train or fashion-mnist:test")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder or bucket prefix for shard-NNNNNN.tar and index.json")
    parser.add_argument("--per-shard", type=int, default=DEFAULT_PER_SHARD, metavar="N", help="images per shard (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images (sorted order)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in DIR")


def run(args) -> int:
    index = write_shards(args.src, args.out, per_shard=args.per_shard, limit=args.limit, overwrite=args.overwrite)
    print(f"wrote {index['count']} images in {len(index['shards'])} shards to {args.out} "
          f"({len(index['skipped'])} skipped)")
    for item in index["skipped"][:20]:
        print(f"  skipped {item['source']}: {item['reason']}")
    if len(index["skipped"]) > 20:
        print(f"  ... {len(index['skipped']) - 20} more in {storage.join(args.out, 'index.json')}")
    return 0
