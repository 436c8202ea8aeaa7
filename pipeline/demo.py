"""`barlow demo`: the whole flow on the embedded default, Fashion-MNIST, sized for a 2-core CPU.

shards -> a short pretraining -> ONNX export -> a kNN check against raw pixels -> batch-embed and index the test split -> one
search -> `barlow serve` with /embed, /search and the search page, one image embedded over HTTP, then
serving until Ctrl-C, with the page's address as the last line (`--no-serve` stops there, for scripts
and tests). Every stage is the real command a user would run; the demo only chooses small sizes.
Re-running skips finished stages (an existing RUN_DIR resumes; a finished one is kept).
"""

from __future__ import annotations

import json
import logging
import signal
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.config import Config, apply
from pipeline.data import shards
from pipeline.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from pipeline.embed.embed import embed
from pipeline.embed.index import build_index
from pipeline.embed.search import search_images
from pipeline.train import loop as train
from pipeline.train.presets import PRESETS

log = logging.getLogger(__name__)

QUALITY_BANK, QUALITY_QUERIES = 10000, 2000  # the demo's kNN check: ~20 s on 2 cores
# The `small` preset (made for 2 CPU cores) for about one epoch, 4-5 minutes: the loss falls and C sharpens;
# it takes about an hour to beat raw pixels (bench/quality.py), and the quality line says so.
DEMO_PRESET, DEMO_STEPS = "small", 240
DEMO_OVERRIDES = {"optim": {"warmup_epochs": 0.1}, "train": {"log_every": 10, "diag_every": 60, "checkpoint_every": 60}}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for shards, RUN_DIR, MODEL_DIR, index")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps")
    parser.add_argument("--port", type=int, default=3000, help="port of the demo server")
    parser.add_argument("--no-serve", action="store_true", help="stop after one request instead of serving")


def pretrain(out: Path, steps: int) -> Path:
    shard_dir = out / "shards" / "train"
    if not (shard_dir / "index.json").exists():
        log.info("writing Fashion-MNIST training shards to %s", shard_dir)
        shards.write_shards("fashion-mnist:train", shard_dir, overwrite=True)
    config = Config()
    apply(config, PRESETS[DEMO_PRESET])
    apply(config, DEMO_OVERRIDES)
    config.data.urls = str(shard_dir)
    config.train.steps = steps
    run_dir = out / "run"
    train.train(config, run_dir)
    return run_dir


def demo_query(model_dir: str | Path, out_dir: str | Path, k: int = 5, query: int = 0,
               limit: int | None = None) -> dict[str, Any]:
    """The search part of `make demo`: index Fashion-MNIST test with MODEL_DIR and run one query.

    Writes (or reuses) `out_dir/shards/test`, `out_dir/embeddings`, `out_dir/index` (the first `limit`
    test images; all 10,000 by default). The query is test image `query`, upscaled 2x and re-encoded
    as JPEG (a copy the index has never seen). Returns {"query": {...}, "neighbours": [...],
    "summary": "<one line>"}; labels are class names.
    """
    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards" / "test"
    if not (shard_dir / "index.json").exists():
        shards.write_shards("fashion-mnist:test", shard_dir, limit=limit, overwrite=True)
    embed(model_dir, str(shard_dir), out_dir / "embeddings")  # resumes: nothing to do on a re-run
    if not (out_dir / "index" / "index.json").exists():
        build_index(out_dir / "embeddings", out_dir / "index")
    images, labels = read_fashion_mnist("test")
    copy = out_dir / f"query-{query}.jpg"
    Image.fromarray(images[query]).resize((56, 56), Image.Resampling.BICUBIC).save(copy, "JPEG", quality=90)
    hits = search_images(out_dir / "index", model_dir, [copy], k)
    for hit in hits:
        hit["label"] = FASHION_MNIST_CLASSES[hit["label"]] if hit["label"] is not None else None
    truth = FASHION_MNIST_CLASSES[int(labels[query])]
    same = sum(hit["label"] == truth for hit in hits)
    summary = (f"query {copy.name} (test image {query}, {truth}, resized and re-encoded): top-1 {hits[0]['key']} "
               f"({hits[0]['label']}, cosine {hits[0]['score']:.3f}); {same} of {len(hits)} neighbours are {truth}")
    return {"query": {"path": str(copy), "test_index": query, "label": truth}, "neighbours": hits, "summary": summary}


def quality_report(model_dir: str | Path, bank: int = QUALITY_BANK, queries: int = QUALITY_QUERIES) -> dict[str, Any]:
    """kNN top-1 of the demo encoder on `queries` test images against `bank` training images, next to raw
    pixels and the same network at random initialisation, and one plain sentence saying what it means."""
    from pipeline.evaluate.run import evaluate

    result = evaluate(str(model_dir), "fashion-mnist:train", "fashion-mnist:test", ("knn",), baselines=True,
                      limit_train=bank, limit_test=queries)
    model, raw, random = (result["knn"]["top1"], result["baselines"]["raw_knn"]["top1"],
                          result["baselines"]["random_knn"]["top1"])
    verdict = ("above raw pixels: the pretraining taught the encoder something pixels do not show"
               if model > raw else
               "below raw pixels: this run was too short to beat them (bench/quality.py --preset small --minutes 60 "
               "shows what an hour does)")
    summary = (f"kNN top-1 on {queries} test images ({bank} training images as the bank): encoder {model:.1%}, "
               f"raw pixels {raw:.1%}, random init {random:.1%} -- {verdict}")
    return {"knn": model, "raw_knn": raw, "random_knn": random, "summary": summary}


def multipart(field: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def run(args) -> int:
    from pipeline.export import export_model
    from pipeline.runtime import POINTER, resolve_model_dir, sha256_file
    from pipeline.serve import start_server

    out = Path(args.out)
    run_dir = pretrain(out, args.steps)

    model_dir = out / "model"
    exported = (model_dir / POINTER).is_file() and json.loads(
        (resolve_model_dir(model_dir) / "model.json").read_text())["source"]["sha256"] == sha256_file(run_dir / "encoder.pt")
    if not exported:
        info = export_model(run_dir, model_dir)
        print(f"MODEL_DIR {model_dir}: {info['name']}, dim {info['dim']}, parity max abs diff "
              f"{info['parity']['max_abs']:.2e}")
    print(f"quality: {quality_report(model_dir)['summary']}", flush=True)
    result = demo_query(model_dir, out / "search")
    print(f"search: {result['summary']}")

    index_dir = out / "search" / "index"
    server = start_server(model_dir, port=args.port, index_dir=index_dir)
    try:
        query = Path(result["query"]["path"])
        body, content_type = multipart("images", query.name, query.read_bytes(), "image/jpeg")
        request = urllib.request.Request(f"{server.url}/embed", data=body, headers={"Content-Type": content_type})
        # B310 false positive: the URL is the http:// address of the server this demo just started
        with urllib.request.urlopen(request, timeout=60) as response:  # nosec B310
            embedding = json.loads(response.read())
        print(f"POST {server.url}/embed -> model {embedding['model']}, dim {embedding['dim']}, "
              f"first values {[round(v, 4) for v in embedding['embeddings'][0][:4]]}")
        print(f"try it:\n  curl -F images=@{query} {server.url}/embed\n  curl -F images=@{query} -F k=5 {server.url}/search")
        if args.no_serve:
            print(f"search page: barlow serve {model_dir} --index {index_dir}, then open http://127.0.0.1:{args.port}/")
            return 0
        print(f"search page: {server.url}/ (drop an image there; serving until Ctrl-C)", flush=True)
        # Blocked so that sigwait takes them: SIGTERM's default action would end this process before the
        # finally below stops the server, which runs in its own session and would be left behind.
        stops = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        signal.sigwait(stops)
        return 0
    finally:
        code = server.stop()
        log.info("server stopped (exit code %s)", code)
