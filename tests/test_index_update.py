"""barlow index re-run on a changed EMB_DIR: new parts added, superseded and pruned parts' rows dropped,
the same answers as a full rebuild, ivf-pq retrained only when its training no longer fits, every step
atomic (a failed publish leaves the previous index served), and EMB_DIR and INDEX_DIR in a bucket.

EMB_DIRs are written directly with parts.py's writer and random vectors: no model is needed."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import cli, storage
from pipeline.embed.index import build_index, growth_reason
from pipeline.embed.parts import new_meta, part_name, write_part
from pipeline.embed.search import SearchIndex, local_index
from pipeline.errors import UserError

from helpers_embed import clustered_vectors

pytest.importorskip("faiss")

MODEL = {"name": "m", "sha256": "abc", "dim": 8, "image_size": 32}


def put_part(emb: str, stem: str, keys: list[str], vectors: np.ndarray, version: str = "v1",
             replaces: tuple[str, ...] = (), model: dict = MODEL) -> str:
    """Write one part of `keys` (source `src/<key>`, identity `version`) into EMB_DIR; returns its name."""
    sources = {f"src/{key}": version for key in keys}
    name = part_name(stem, sources, model["sha256"])
    meta = new_meta(model, True, "file", sources, len(keys), [], list(replaces))
    write_part(storage.join(emb, name), list(keys), list(sources), [None] * len(keys), vectors, meta)
    return name


def unit(rng, count: int, dim: int = 8) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def keys_of(stem: str, count: int) -> list[str]:
    return [f"{stem}{i}" for i in range(count)]


def indexed_keys(index_dir: Path) -> list[str]:
    info = json.loads((index_dir / "index.json").read_text())
    return pq.read_table(index_dir / info["generation"] / "keys.parquet").column("key").to_pylist()


def same_answers(a: SearchIndex, b: SearchIndex, queries: np.ndarray, k: int = 7) -> None:
    for got, want in zip(a.search(queries, k), b.search(queries, k)):
        assert [h["key"] for h in got] == [h["key"] for h in want]
        assert np.allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-6)


@pytest.fixture
def changed_emb(tmp_path):
    """EMB_DIR indexed once into tmp/index, then changed: parts e and f new, b superseded by b2 (10 rows
    changed, b's file still there), c pruned to 20 rows by c2, d deleted. Returns (emb, index_dir, facts)."""
    rng = np.random.default_rng(0)
    emb, out = str(tmp_path / "emb"), tmp_path / "index"
    vectors = {stem: unit(rng, 40) for stem in "abcd"}
    names = {stem: put_part(emb, stem, keys_of(stem, 40), vectors[stem]) for stem in "abcd"}
    first = build_index(emb, out)
    assert first["last_run"]["action"] == "rebuild" and first["count"] == 160

    for stem in "ef":
        put_part(emb, stem, keys_of(stem, 30), unit(rng, 30))
    changed = vectors["b"].copy()
    changed[:10] = unit(rng, 10)
    put_part(emb, "b", keys_of("b", 40), changed, version="v2", replaces=(names["b"],))
    put_part(emb, "c", keys_of("c", 20), vectors["c"][:20], replaces=(names["c"],))
    (tmp_path / "emb" / names["d"]).unlink()
    live = keys_of("a", 40) + keys_of("b", 40) + keys_of("c", 20) + keys_of("e", 30) + keys_of("f", 30)
    gone = keys_of("c", 40)[20:] + keys_of("d", 40)
    return emb, out, {"live": live, "gone": gone, "changed": changed[:10], "first": first, "names": names}


def test_an_updated_flat_index_answers_like_a_full_rebuild(changed_emb, tmp_path, caplog):
    emb, out, facts = changed_emb
    caplog.set_level(logging.INFO, logger="pipeline.embed.index")
    info = build_index(emb, out)
    done = info["last_run"]
    assert done["action"] == "update" and not done["retrained"]
    assert (done["added"], done["removed"], info["count"]) == (120, 120, 160)
    assert sorted(done["parts_removed"]) == sorted(facts["names"].values())[1:], "b, c and d's rows dropped"
    assert "added 120 embeddings of 4 new parts, removed 120 of 3 parts no longer live" in caplog.text
    assert info["created"] == facts["first"]["created"] and info["previous_generation"] == facts["first"]["generation"]

    fresh = build_index(emb, tmp_path / "fresh")
    a, b = SearchIndex(out), SearchIndex(tmp_path / "fresh")
    queries = np.concatenate([unit(np.random.default_rng(9), 30), facts["changed"]])
    same_answers(a, b, queries)
    assert info["parts"] == fresh["parts"]

    keys = Counter(indexed_keys(out))
    assert keys == Counter(facts["live"]), "every live key exactly once"
    assert not set(facts["gone"]) & set(keys), "no row of a pruned or deleted part"
    top = a.search(facts["changed"], 1)
    assert [h[0]["key"] for h in top] == keys_of("b", 10) and all(h[0]["score"] > 0.9999 for h in top), \
        "a superseded row's new vector replaced its old one"
    assert {p.name for p in out.iterdir()} == {"index.json", facts["first"]["generation"], info["generation"]}

    again = build_index(emb, out)
    assert again["last_run"]["action"] == "none" and again["generation"] == info["generation"]
    put_part(emb, "g", keys_of("g", 5), unit(np.random.default_rng(3), 5))
    third = build_index(emb, out, mode="update")
    assert third["last_run"]["added"] == 5 and third["count"] == 165
    assert {p.name for p in out.iterdir()} == {"index.json", info["generation"], third["generation"]}, \
        "the generation before the current one is kept for readers, older ones deleted"


def test_a_failed_publish_leaves_the_previous_index_served(changed_emb, monkeypatch):
    emb, out, facts = changed_emb

    def killed(location, data, indent=1):
        raise KeyboardInterrupt  # as if killed just before index.json was replaced

    monkeypatch.setattr(storage, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(emb, out)
    monkeypatch.undo()
    index = SearchIndex(out)
    assert len(index) == 160 and index.info["generation"] == facts["first"]["generation"]
    assert len([p for p in out.iterdir() if p.name.startswith("gen-")]) == 2, "the new generation, unnamed"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no build folder left behind"
    info = build_index(emb, out)
    assert info["last_run"]["action"] == "update" and info["count"] == 160
    assert len([p for p in out.iterdir() if p.name.startswith("gen-")]) == 2, "the orphan generation deleted"


def test_update_refusals_and_rebuild_reasons(tmp_path, caplog, capsys):
    rng = np.random.default_rng(1)
    emb, out = str(tmp_path / "emb"), tmp_path / "index"
    put_part(emb, "a", keys_of("a", 20), unit(rng, 20))
    with pytest.raises(UserError, match="holds no index to update; run barlow index without --update"):
        build_index(emb, out, mode="update")
    assert cli.main(["index", emb, "--out", str(out)]) == 0
    assert "built: flat index of 20 embeddings" in capsys.readouterr().out
    with pytest.raises(UserError, match="cannot update .*: its index is flat, not ivf-pq; drop --update"):
        build_index(emb, out, kind="ivf-pq", mode="update")

    caplog.set_level(logging.INFO, logger="pipeline.embed.index")
    assert build_index(emb, out, mode="rebuild")["last_run"]["reason"] == "--rebuild"
    other = str(tmp_path / "other")
    put_part(other, "a", keys_of("a", 20), unit(rng, 20), model={**MODEL, "name": "m2", "sha256": "def"})
    info = build_index(other, out)
    assert info["last_run"]["action"] == "rebuild" and info["model"]["name"] == "m2"
    assert "its index is of another model (m, sha256 abc)" in caplog.text

    index_json = out / "index.json"  # a format-1 index: refused when searched, rebuilt by barlow index
    index_json.write_text(json.dumps({**json.loads(index_json.read_text()), "format": "barlow-embed/index/1"}))
    with pytest.raises(UserError, match="is not a barlow-embed/index/2 index; rebuild it with barlow index"):
        SearchIndex(out)
    assert build_index(other, out)["last_run"]["reason"] == "its index is not a barlow-embed/index/2 index"
    with pytest.raises(UserError, match="holds no embeddings parts"):
        build_index(str(tmp_path / "nothing"), out)


def test_ivf_pq_grows_without_retraining_until_the_data_shifts(tmp_path, caplog):
    """dim 16 keeps training to about a second; ivf-pq needs 10,000 embeddings to train at all."""
    caplog.set_level(logging.INFO, logger="pipeline.embed.index")
    vectors = clustered_vectors(11_000, 16)
    model = {**MODEL, "dim": 16}
    emb, out = str(tmp_path / "emb"), tmp_path / "index"
    first = put_part(emb, "a", keys_of("a", 5000), vectors[:5000], model=model)
    put_part(emb, "b", keys_of("b", 5000), vectors[5000:10_000], model=model)
    built = build_index(emb, out, kind="ivf-pq")
    assert built["trained_count"] == 10_000 and built["train_residual"] > 0 and built["last_run"]["retrained"]

    put_part(emb, "c", keys_of("c", 1000), vectors[10_000:], model=model)  # the same distribution
    info = build_index(emb, out)
    assert info["kind"] == "ivf-pq" and info["count"] == 11_000
    assert info["last_run"]["action"] == "update" and not info["last_run"]["retrained"]
    assert "training kept" in info["last_run"]["reason"] and info["train_residual"] == built["train_residual"]
    index = SearchIndex(out)
    found = [hits[0]["key"] for hits in index.search(vectors[10_000:10_100], 1)]
    assert np.mean([f == f"c{i}" for i, f in enumerate(found)]) > 0.9, "the added vectors are found"

    (tmp_path / "emb" / first).unlink()
    info = build_index(emb, out)
    assert info["count"] == 6000 and info["last_run"]["removed"] == 5000 and not info["last_run"]["retrained"]
    assert "re-added 6,000 embeddings to drop 5,000; training kept" in caplog.text
    assert Counter(indexed_keys(out)) == Counter(keys_of("b", 5000) + keys_of("c", 1000))

    shifted = clustered_vectors(2000, 16, seed=7)  # other cluster centres: far from the trained lists
    put_part(emb, "d", keys_of("d", 2000), shifted, model=model)
    with pytest.raises(UserError, match="ivf-pq needs at least 10,000"):  # retraining on 8,000 is refused
        build_index(emb, out)
    put_part(emb, "e", keys_of("e", 3000), clustered_vectors(3000, 16, seed=8), model=model)
    info = build_index(emb, out)
    assert info["last_run"]["action"] == "rebuild" and info["last_run"]["retrained"]
    assert "retraining: the new embeddings fit the trained lists worse" in info["last_run"]["reason"]
    assert info["trained_count"] == 10_240 and info["count"] == 11_000


def test_growth_beyond_twice_the_trained_lists_retrains():
    info = {"nlist": 100}  # trained for 10,000 embeddings
    assert growth_reason(info, 40_000) is None
    assert "want 201 lists, more than 2 x the 100" in growth_reason(info, 201 * 201)


def test_emb_dir_and_index_dir_in_a_bucket(s3, tmp_path, capsys):
    client = s3.client()
    for bucket in ("emb", "idx"):
        client.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(4)
    emb, out = "s3://emb/set", "s3://idx/flat"
    names = [put_part(emb, stem, keys_of(stem, 10), unit(rng, 10)) for stem in "ab"]
    assert build_index(emb, out)["count"] == 20
    put_part(emb, "c", keys_of("c", 10), unit(rng, 10))
    client.delete_object(Bucket="emb", Key=f"set/{names[0]}")
    info = build_index(emb, out)
    assert info["last_run"]["action"] == "update" and (info["last_run"]["added"], info["count"]) == (10, 20)
    put_part(emb, "d", keys_of("d", 10), unit(rng, 10))
    third = build_index(emb, out)
    listed = sorted(o["Key"] for o in client.list_objects_v2(Bucket="idx")["Contents"])
    assert listed == sorted(["flat/index.json", *(f"flat/{g}/{f}" for g in (info["generation"], third["generation"])
                                                  for f in ("index.faiss", "keys.parquet"))]), "the oldest deleted"
    index = SearchIndex(out)
    assert len(index) == 30
    assert {index.row(i, 0)["key"] for i in range(30)} == set(keys_of("b", 10) + keys_of("c", 10) + keys_of("d", 10))
    folder = local_index(out)  # what the server opens: index.json beside the generation it names
    assert len(SearchIndex(folder)) == 30 and json.loads((folder / "index.json").read_text()) == third
    assert cli.main(["search", out, "--key", "c3", "-k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
