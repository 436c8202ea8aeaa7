"""EMB_DIR's record: immutable parquet parts, each naming the sources it embedded.

A part holds rows (key, source, label, shard, embedding) and, in its parquet footer, what it covers:
`sources` maps every input it read (an image object, a file or a whole tar shard) to that input's
identity when read (ETag, generation or size + mtime), failures included. Nothing is ever decided by
file name: a re-run compares the identities it lists now with the ones the parts recorded.

`shard` is where a row's image bytes live when they came from a tar shard: that shard's URL (the member
is the row's key); null for an image object or file, which `source` names. `source` alone cannot say
it: `barlow shards` records each image's original path there. Parts written before this column
existed read as null.

Parts are never edited. Re-embedding changed sources, or pruning vanished ones, writes a new part
whose `replaces` names the parts it supersedes (transitively), then deletes them. A reader takes the
*live* parts: every readable part not named in another one's `replaces`. So at any moment, even
after a kill between the write and the delete, the live parts hold each source exactly once. Part
names are a digest of their content's sources, so parallel writers never choose the same name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "barlow-embed/embeddings/2"
META_KEY = b"barlow"  # parquet footer key holding a part's JSON metadata
PART_GLOB = "part-*.parquet"
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass
class Part:
    """A readable part: its file name, location and footer metadata."""

    name: str
    location: str
    meta: dict[str, Any]

    @property
    def sources(self) -> dict[str, str | None]:
        return self.meta["sources"]

    @property
    def count(self) -> int:
        return int(self.meta["count"])


@dataclass
class Parts:
    """EMB_DIR as found: live parts, superseded ones awaiting deletion, and unreadable files."""

    live: dict[str, Part] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def owner(self) -> dict[str, str]:
        """source -> name of the live part that holds it."""
        return {source: part.name for part in self.live.values() for source in part.sources}


def part_name(stem: str, sources: dict[str, str | None], model_sha: str) -> str:
    """`part-<stem>-<digest>.parquet`; the digest covers the sources, their identities and the model."""
    text = json.dumps([model_sha, sorted(sources.items(), key=lambda kv: kv[0])], default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"part-{stem}-{digest}.parquet"


def part_schema(dim: int, meta: dict[str, Any] | None = None):
    import pyarrow as pa

    schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("label", pa.int32()),
                        ("shard", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    return schema.with_metadata({META_KEY: json.dumps(meta).encode()}) if meta is not None else schema


def new_meta(model: dict[str, Any], normalized: bool, unit: str, sources: dict[str, str | None], count: int,
             failures: list[dict[str, str]], replaces: list[str]) -> dict[str, Any]:
    return {"format": EMBEDDINGS_FORMAT, "model": model, "normalized": normalized, "unit": unit,
            "sources": sources, "count": count, "failures": failures, "replaces": sorted(set(replaces)),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_part(location: str, keys: list[str], sources: list[str], labels: list[int | None], embeddings: np.ndarray,
               meta: dict[str, Any], shards: list[str | None] | None = None) -> None:
    """One part, published whole (a local rename, or one upload to a bucket); `shards` None: no row is from a
    tar shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = int(meta["model"]["dim"])
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(len(keys), dim)
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    table = pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array(sources, pa.string()), pa.array(labels, pa.int32()),
         pa.array(shards or [None] * len(keys), pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)], schema=part_schema(dim, meta))
    # open() on the temp path: a Python-level write, so fault tests can refuse it
    with storage.output(location) as temp, open(temp, "wb") as file:
        pq.write_table(table, file)


def read_meta(location: str) -> dict[str, Any] | None:
    """A part's footer metadata, or None when the file is not a readable part of this format."""
    import pyarrow.parquet as pq

    try:
        fs, path = storage.filesystem(location)
        with fs.open(path, "rb") as file:
            metadata = pq.read_schema(file).metadata or {}
        meta = json.loads(metadata[META_KEY])
    except Exception:  # a torn or foreign file: treated as absent
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == EMBEDDINGS_FORMAT else None


ROW_COLUMNS = ("key", "source", "label", "shard")


def read_table(location: str):
    """(table of key/source/label/shard, float32 [N, D] embeddings as stored) of one part."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(location)
    with storage.errors_as_sentences(location), fs.open(path, "rb") as file:
        table = pq.read_table(file)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return with_row_columns(table), vectors


def with_row_columns(table):
    """ROW_COLUMNS of a part's or an index's rows, `shard` null where an older file has none."""
    import pyarrow as pa

    if "shard" not in table.column_names:
        table = table.append_column("shard", pa.nulls(len(table), pa.string()))
    return table.select(list(ROW_COLUMNS))


def stored_keys(parts: Parts) -> dict[str, str]:
    """source -> row key of everything the live parts hold: their rows and their listed failures."""
    import pyarrow.parquet as pq

    keys: dict[str, str] = {}
    for part in parts.live.values():
        keys.update((f["source"], f["key"]) for f in part.meta.get("failures", []) if "key" in f and "source" in f)
        fs, path = storage.filesystem(part.location)
        with storage.errors_as_sentences(part.location), fs.open(path, "rb") as file:
            table = pq.read_table(file, columns=["key", "source"])
        keys.update(zip(table.column("source").to_pylist(), table.column("key").to_pylist()))
    return keys


def part_locations(emb_dir: str) -> list[str]:
    """Every part file of EMB_DIR ([] when it does not exist yet)."""
    fs, path = storage.filesystem(emb_dir)
    with storage.errors_as_sentences(emb_dir):
        if not fs.exists(path):
            return []
        names = fs.glob(f"{path.rstrip('/')}/{PART_GLOB}")
    return sorted(storage.url_of(fs, n, emb_dir) for n in names)


def find_parts(emb_dir: str) -> Parts:
    """The live parts of EMB_DIR (see the module docstring)."""
    found: dict[str, Part] = {}
    result = Parts()
    for location in part_locations(emb_dir):
        meta = read_meta(location)
        name = storage.name_of(location)
        if meta is None:
            result.unreadable.append(name)
            continue
        found[name] = Part(name, location, meta)
    replaced = {old for part in found.values() for old in part.meta.get("replaces", [])}
    result.dead = sorted(replaced & found.keys())
    result.live = {name: part for name, part in found.items() if name not in replaced}
    return result


def check_one_model(parts: Parts, model: dict[str, Any] | None, emb_dir: str) -> dict[str, Any] | None:
    """The one model of EMB_DIR's live parts (and `model`, when given); refuses a mix."""
    for part in parts.live.values():
        theirs = part.meta.get("model", {})
        if model is None:
            model = theirs
            continue
        if theirs.get("sha256") != model.get("sha256"):
            raise UserError(
                f"{emb_dir} holds embeddings of another model ({part.name}: {theirs.get('name')}, sha256 "
                f"{str(theirs.get('sha256'))[:12]}) than {model.get('name')} (sha256 {str(model.get('sha256'))[:12]}); "
                "embed each model into its own folder")
    return model
