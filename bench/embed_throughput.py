"""Batch-embedding and search benchmark, in one run on one machine.

Embedding: end-to-end images/s of `barlow embed` (JPEG shards read, decoded and preprocessed in
DataLoader workers, ONNX Runtime in the main process, parquet parts written) against the raw model
images/s (ONNX Runtime on ready uint8 batches) at the same batch and provider, and their ratio
(target >= 0.9: the model is never starved). Both are steady-state rates, after session load and the
first batch. Writes bench/results/embed-<device>-<date>.json (--out: another folder).

In the same run, the same images from a bucket: a moto S3 server on 127.0.0.1 (the tests' endpoint,
tests/helpers_s3.py) gets them as (i) one object per image and (ii) the same tar shards, and `barlow
embed` reads each from s3:// into an s3:// EMB_DIR: `s3_objects_images_per_s`, `s3_shards_images_per_s`,
`s3_over_local` (target >= 0.8 for shards on a CPU) and `s3_requests_per_image`, counted from the
server's request log (one line per HTTP request, listing and part uploads included). A loopback
endpoint has no network latency: this measures the client side (s3fs, request count, in-flight
fetches), not a real bucket's bandwidth. --skip-s3 leaves it out.

Search: faiss build time, single-query latency (p50/p99) and ivf-pq recall@10 against flat, for N
synthetic vectors at D = 512 and 2048. The vectors have a low intrinsic dimension, like real
embeddings; on pure noise no index beats a scan. Writes
bench/results/search-<date>.json. Skipped, with a note, when faiss is not installed.

    python bench/embed_throughput.py                                       # CPU: ResNet-50, 224 px
    python bench/embed_throughput.py --provider cuda --images 20000        # GPU
    python bench/embed_throughput.py --arch resnet18 --image-size 32 --skip-search
    python bench/embed_throughput.py --skip-s3 --skip-search                # local disk only
    python bench/embed_throughput.py --skip-embed --search-n 100000 1000000
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.export import versions  # noqa: E402
from pipeline.runtime import usable_cpus  # noqa: E402

from common import (RESULTS, commit, device_label, random_model,  # noqa: E402  (also puts the repo on sys.path)
                    write_record)

PACKAGES = ("onnxruntime-gpu", "onnxruntime", "faiss-cpu", "torch", "pyarrow", "webdataset")  # in the record

MAX_PER_SHARD = 1000  # real buckets have many shards; small runs get at least two per decode worker
DISTINCT_JPEGS = 256  # distinct photos, repeated under new keys: decoding costs the same, generating less
S3_TARGET = 0.8  # s3 shards / local shards images/s, on a CPU
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REQUEST_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')  # werkzeug's access log, one per request




def device_name(providers: list[str]) -> str:
    """What ran the model: the GPU's name when a GPU provider did, else cpu-<N>core."""
    return device_label(bool(providers) and providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))




def photo_jpegs(count: int, width: int, height: int) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields with an edge) at a typical ImageNet size."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    blobs = []
    for _ in range(count):
        pixels = np.stack([np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) + y * rng.uniform(-2, 2)
                           for _ in range(3)], -1)
        pixels += (x > rng.uniform(0.2, 0.8))[..., None] * rng.uniform(-0.8, 0.8, 3)
        pixels = ((pixels - pixels.min()) / np.ptp(pixels) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def per_shard(count: int) -> int:
    return max(50, min(MAX_PER_SHARD, count // (2 * usable_cpus())))


def write_jpeg_shards(out: Path, count: int, blobs: list[bytes]) -> Path:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard(count), verbose=0) as writer:
        for i in range(count):
            writer.write({"__key__": f"{i:09d}", "jpg": blobs[i % len(blobs)]})
    return out


def raw_images_per_s(model_dir: Path, provider: str, batch: int, seconds: float) -> tuple[float, list[str]]:
    """ONNX Runtime alone on ready uint8 batches, after warm-up."""
    from pipeline.runtime import OnnxModel, resolve_model_dir

    encoder = OnnxModel(resolve_model_dir(model_dir), provider, max_batch=batch)
    images = np.random.default_rng(0).integers(0, 256, (batch, 3, encoder.image_size, encoder.image_size), np.uint8)
    for _ in range(3):
        encoder(images)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder(images)
        done += batch
    return done / (time.perf_counter() - start), encoder.providers


def run_summary(run: dict) -> dict:
    return {"duration_s": run["duration_s"], "startup_s": run["startup_s"], "images": run["images"],
            "written": run["parts_written"], "workers": run["workers"], "images_per_s": run["images_per_s"]}


def bench_embed(args: argparse.Namespace, work: Path) -> dict:
    from pipeline.embed.embed import embed
    from pipeline.runtime import resolve_model_dir

    model_dir = args.model_dir or random_model(work, args.arch, args.image_size)
    info = json.loads((resolve_model_dir(model_dir) / "model.json").read_text())
    blobs = photo_jpegs(min(args.images, DISTINCT_JPEGS), *args.photo_size)
    shards = write_jpeg_shards(work / "shards", args.images, blobs)
    raw, providers = raw_images_per_s(Path(model_dir), args.provider, args.batch_size, args.raw_seconds)
    shutil.rmtree(work / "emb", ignore_errors=True)  # a kept --work-dir: embed is incremental, time a full run
    manifest = embed(model_dir, str(shards), work / "emb", batch_size=args.batch_size, workers=args.workers,
                     device=args.provider)
    run = manifest["this_run"]
    assert manifest["count"] == args.images, manifest["count"]
    record = {
        "device": device_name(providers), "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "embed_images_per_s": run["images_per_s"], "raw_images_per_s": round(raw, 2),
        "ratio": round(run["images_per_s"] / raw, 3),
        "config": {"arch": info["arch"], "image_size": info["image_size"], "dim": info["dim"],
                   "batch_size": args.batch_size, "workers": run["workers"], "providers": providers,
                   "images": args.images, "jpeg_size": list(args.photo_size), "per_shard": per_shard(args.images),
                   "cpus": usable_cpus()},
        "embed_run": run_summary(run),
        "load_average": os.getloadavg()[0],  # other work on the machine skews CPU numbers
        "versions": versions(PACKAGES),
    }
    if not args.skip_s3:
        record.update(bench_s3(args, work, model_dir, shards, blobs, run["images_per_s"]))
        record["load_average_after_s3"] = os.getloadavg()[0]
    return record


# ---------------------------------------------------------------- the same images from a bucket


def s3_server_class():
    """tests/helpers_s3.py's S3Server (moto's server mode as a child process), imported by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "helpers_s3.py"
    spec = importlib.util.spec_from_file_location("helpers_s3", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.S3Server


@contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set (DataLoader workers fork and inherit it), restored afterwards."""
    from pipeline import storage

    saved = {name: os.environ.get(name) for name in [*values, storage.OPTIONS_ENV]}
    os.environ.update(values)
    os.environ.pop(storage.OPTIONS_ENV, None)
    storage._filesystems.clear()  # s3fs clients made under other variables
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        storage._filesystems.clear()


def count_requests(log: Path, offset: int) -> dict:
    """HTTP requests the server logged after byte `offset`: total, by method, and non-2xx answers."""
    with open(log, "rb") as file:
        file.seek(offset)
        text = ANSI.sub("", file.read().decode(errors="replace"))  # werkzeug colours the non-2xx lines
    by_method: dict[str, int] = {}
    errors = 0
    for method, _, status in REQUEST_LINE.findall(text):
        by_method[method] = by_method.get(method, 0) + 1
        errors += not status.startswith("2")
    return {"total": sum(by_method.values()), "by_method": dict(sorted(by_method.items())), "not_2xx": errors}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def upload_all(client, bucket: str, objects: list[tuple[str, bytes | Path]], threads: int = 16) -> None:
    def one(item):
        key, body = item
        if isinstance(body, Path):
            client.upload_file(str(body), bucket, key)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=body)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, objects))


def bench_s3(args: argparse.Namespace, work: Path, model_dir: Path, shards: Path, blobs: list[bytes],
             local_rate: float) -> dict:
    """`barlow embed` of the same images from a local S3 endpoint, as objects and as shards."""
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError:
        logging.warning("moto or boto3 is not installed: the S3 benchmark is skipped (pip install 'moto[server]')")
        return {"s3": {"skipped": "moto or boto3 is not installed"}}
    from pipeline.embed.embed import DEFAULT_FETCHES, embed

    fetches = args.fetches or DEFAULT_FETCHES
    log = work / "moto.log"
    server = s3_server_class().start(log)
    results: dict[str, dict] = {}
    try:
        with environment(server.env()):
            client = server.client()
            client.create_bucket(Bucket="bench-data")
            client.create_bucket(Bucket="bench-emb")
            start = time.perf_counter()
            upload_all(client, "bench-data", [(f"objects/{i:09d}.jpg", blobs[i % len(blobs)])
                                              for i in range(args.images)])
            upload_all(client, "bench-data", [(f"shards/{p.name}", p) for p in sorted(shards.glob("*.tar"))])
            logging.info("uploaded %d objects and %d shards to moto in %.1f s", args.images,
                         len(list(shards.glob("*.tar"))), time.perf_counter() - start)
            for kind in ("objects", "shards"):
                offset, server_cpu = log.stat().st_size, cpu_seconds(server.process.pid)
                try:
                    manifest = embed(model_dir, f"s3://bench-data/{kind}", f"s3://bench-emb/{kind}",
                                     batch_size=args.batch_size, workers=args.workers, device=args.provider,
                                     fetches=fetches)
                except Exception as exc:  # recorded: the local figures above still stand
                    logging.exception("s3 %s run failed", kind)
                    results[kind] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                time.sleep(0.5)  # the server's last log lines
                run = manifest["this_run"]
                requests = count_requests(log, offset)
                used = cpu_seconds(server.process.pid)
                results[kind] = {**run_summary(run), "count": manifest["count"], "requests": requests,
                                 "requests_per_image": round(requests["total"] / max(1, run["images"]), 4),
                                 # the endpoint shares this machine's CPUs; a real bucket's work is elsewhere
                                 "server_cpu_s": round(used - server_cpu, 2) if used is not None and server_cpu
                                 is not None else None}
    finally:
        server.stop()

    def figure(kind: str, name: str):
        return results[kind].get(name) if kind in results else None

    rates = {kind: figure(kind, "images_per_s") for kind in ("objects", "shards")}
    return {
        "s3_objects_images_per_s": rates["objects"], "s3_shards_images_per_s": rates["shards"],
        "s3_over_local": {kind: round(rate / local_rate, 3) if rate and local_rate else None
                          for kind, rate in rates.items()},
        "s3_over_local_target": {"shards": S3_TARGET},
        "s3_requests_per_image": {kind: figure(kind, "requests_per_image") for kind in ("objects", "shards")},
        "s3": {"endpoint": "moto server on 127.0.0.1 (no network latency)", "fetches": fetches,
               "objects": results.get("objects"), "shards": results.get("shards")},
    }


def embedding_chunks(count: int, dim: int, seed: int, rank: int = 64, chunk: int = 100_000):
    """Unit vectors of low intrinsic dimension: a power-law spectrum over `rank` directions plus a
    little isotropic noise, as real embeddings (RankMe far below D) look. Yielded in chunks so that
    10^6 x 2048 never exists twice in memory (the index holds its own copy)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(12345).standard_normal((dim, rank)))[0].T.astype(np.float32)
    scales = (np.arange(1, rank + 1) ** -0.5).astype(np.float32)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        vectors = (rng.standard_normal((n, rank), dtype=np.float32) * scales) @ basis
        vectors += 0.02 * rng.standard_normal((n, dim), dtype=np.float32)
        yield vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def embeddings_like(count: int, dim: int, seed: int) -> np.ndarray:
    return np.concatenate(list(embedding_chunks(count, dim, seed)))


def latencies_ms(index, queries: np.ndarray, k: int) -> dict:
    """Single-query latency (one vector per search call, as /search with one image)."""
    times = []
    for query in queries:
        start = time.perf_counter()
        index.search(query[None], k)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
            "timed_queries": len(times)}


def bench_search(sizes: list[int], dims: list[int], queries: int, threads: int, k: int = 10,
                 flat_timed: int = 100) -> list[dict]:
    """Build time, latency and recall@10 of ivf-pq against flat's exact answers. The vectors are i.i.d.,
    so ivf-pq trains on fresh draws of the same distribution (`barlow index`: a random sample of the rows).
    Flat's single-query latency is timed on the first `flat_timed` queries (a scan of N x D each)."""
    import faiss

    from pipeline.embed.index import new_index, training_size
    from pipeline.embed.search import apply_search_params

    faiss.omp_set_num_threads(threads)

    records = []
    for dim in dims:
        for count in sizes:
            logging.info("search: N=%d D=%d", count, dim)
            probes = embeddings_like(queries, dim, seed=2)
            record = {"n": count, "dim": dim, "queries": queries, "k": k}
            flat, _ = new_index("flat", dim, count)
            start = time.perf_counter()
            for vectors in embedding_chunks(count, dim, seed=1):
                flat.add(vectors)
            record["flat"] = {"build_s": round(time.perf_counter() - start, 3),
                              **latencies_ms(flat, probes[:flat_timed], k), "bytes_per_vector": 4 * dim}
            _, exact = flat.search(probes, k)
            del flat
            ivf, params = new_index("ivf-pq", dim, count)
            start = time.perf_counter()
            sample = embeddings_like(training_size(params["nlist"]), dim, seed=3)  # same distribution
            ivf.train(sample)
            for vectors in embedding_chunks(count, dim, seed=1):
                ivf.add(vectors)
            build = time.perf_counter() - start
            apply_search_params(ivf, params)
            _, approx = ivf.search(probes, k)
            recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))
            record["ivf_pq"] = {"build_s": round(build, 3), **latencies_ms(ivf, probes, k), **params,
                                "bytes_per_vector": params["pq_bytes"] + dim,  # codes + SQ8 re-ranking store
                                "train_vectors": len(sample), "recall_at_10": round(recall, 4)}
            del ivf
            logging.info("%s", record)
            records.append(record)
    return records


def save(record: dict, name: str, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    write_record(path, record)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="an exported MODEL_DIR (default: a random --arch model)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--photo-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                        help="JPEG size in the shards (default: a typical ImageNet photo)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: barlow embed's)")
    parser.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    parser.add_argument("--raw-seconds", type=float, default=20.0, help="how long to time the raw model")
    parser.add_argument("--fetches", type=int, default=None,
                        help="objects in flight per decode worker for the S3 runs (default: barlow embed's)")
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-s3", action="store_true", help="leave out the S3 (moto) runs of the embed benchmark")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--search-n", type=int, nargs="+", default=[100_000])
    parser.add_argument("--search-dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--faiss-threads", type=int, default=1,
                        help="OpenMP threads for faiss (default 1: per-request latency, as concurrent requests see it)")
    parser.add_argument("--work-dir", type=Path, help="keep the model, shards and parts here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON records (default bench/results)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    date = datetime.date.today().isoformat()
    status = 0

    if not args.skip_embed:
        with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
            work = args.work_dir or Path(tmp)
            record = bench_embed(args, work)
        path = save(record, f"embed-{record['device']}-{date}.json", args.out)
        print(json.dumps({k: record[k] for k in ("device", "embed_images_per_s", "raw_images_per_s", "ratio",
                                                 "s3_objects_images_per_s", "s3_shards_images_per_s", "s3_over_local",
                                                 "s3_requests_per_image") if k in record}))
        print(f"wrote {path}")
        failed = [kind for kind in ("objects", "shards") if (record.get("s3", {}).get(kind) or {}).get("error")]
        if failed:
            print(f"the S3 run of {' and '.join(failed)} failed: see {path}", file=sys.stderr)
            status = 1
    if not args.skip_search:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("faiss is not installed here: search benchmark skipped (pip install faiss-cpu)")
            return status
        record = {"device": f"cpu-{usable_cpus()}core", "commit": commit(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "data": "synthetic unit vectors: rank-64 power-law spectrum + 0.02 noise, cosine",
                  "faiss_threads": args.faiss_threads, "load_average_before": os.getloadavg()[0],
                  "results": bench_search(args.search_n, args.search_dims, args.queries, args.faiss_threads),
                  "load_average_after": os.getloadavg()[0], "versions": versions(PACKAGES)}
        path = save(record, f"search-{date}.json", args.out)
        print(json.dumps(record["results"]))
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
