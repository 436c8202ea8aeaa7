"""Serving throughput: raw ONNX Runtime images/s at batch B (before and after serving; the faster counts),
then /embed images/s with C concurrent clients each sending one JPEG per request (--images-per-request
N: N), p50/p99 latency, and served/raw, in one run. The clients are bench/loadgen.py's, on the same
cores as the server, and admission control admits them all (capacity, not shedding).

served/raw says what the HTTP path (multipart, decode, the hop to the batched encoder, JSON) costs
against the model alone. `provider` and `precision` are what the server's /model says runs, not what
this script expects. --response-format npy has the clients ask for .npy bodies (Accept:
application/x-npy); every record also times the server's own serialisation of a 64 x 2048 response
as JSON floats and as .npy (serving/responses.py, the functions /embed calls).
Writes bench/results/serve-<device>-<arch>-<size>px[-<N>-per-request]-<date>.json.

    python bench/serve_throughput.py                                    # CPU: fmnist model, 32 px
    python bench/serve_throughput.py --arch resnet50 --image-size 224   # GPU: ResNet-50, 224 px
    python bench/serve_throughput.py --model-dir MODEL_DIR              # an exported model
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.devices import gpu_available  # noqa: E402
from pipeline.runtime import OnnxModel, resolve_model_dir  # noqa: E402
from pipeline.runtime import usable_cpus  # noqa: E402
from pipeline.serve import start_server  # noqa: E402
from serving.responses import NPY, json_floats, npy  # noqa: E402
from serving.settings import Settings  # noqa: E402

from loadgen import bodies, run_clients  # noqa: E402
from common import (RESULTS, commit, device_label, random_model,  # noqa: E402  (also puts the repo on sys.path)
                    write_record)

ACCEPT = {"json": "application/json", "npy": NPY}









def jpegs(count: int, image_size: int) -> list[bytes]:
    """Photo-like JPEGs a little larger than the eval size, as a client would send them."""
    rng = np.random.default_rng(0)
    side = max(image_size * 5 // 4, 32)
    y, x = np.mgrid[0:side, 0:side] / side
    blobs = []
    for _ in range(count):
        pixels = np.stack([np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) + y for _ in range(3)], -1)
        pixels = ((pixels - pixels.min()) / np.ptp(pixels) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def raw_throughput(model_dir: Path, batch: int, seconds: float, mixed: bool = True) -> tuple[float, float, list[str]]:
    """Images/s of the session alone, configured as the server configures it: at a fixed batch B,
    and (mixed) cycling through every size 1..B as adaptive batches do (shape changes can cost on GPUs;
    nan when not measured)."""
    encoder = OnnxModel(resolve_model_dir(model_dir), os.environ.get("BARLOW_DEVICE", "auto"), max_batch=batch)
    images = np.random.default_rng(0).integers(0, 256, (batch, 3, encoder.image_size, encoder.image_size),
                                               dtype=np.uint8)
    encoder.warm_up(tuple(range(1, batch + 1)))
    rates = []
    for sizes in ([batch], list(range(1, batch + 1)))[:2 if mixed else 1]:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            for size in sizes:
                encoder(images[:size])
                done += size
        rates.append(done / (time.perf_counter() - start))
    return rates[0], rates[1] if mixed else float("nan"), encoder.providers


def serialisation_ms(rows: int = 64, dim: int = 2048, repeats: int = 20) -> dict:
    """Server-side time to serialise one rows x dim response: JSON floats vs .npy (best of `repeats`)."""
    embeddings = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)  # what /embed returns by default
    best = {}
    for name, serialise in (("json", lambda: json_floats("model", dim, embeddings)), ("npy", lambda: npy(embeddings))):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            serialise()
            times.append(time.perf_counter() - start)
        best[name] = min(times) * 1000
    return {f"json_ms_per_{rows}x{dim}": round(best["json"], 3), f"npy_ms_per_{rows}x{dim}": round(best["npy"], 3),
            "json_over_npy_serialisation": round(best["json"] / best["npy"], 1)}


def server_runtime(url: str) -> dict:
    """The encoder's provider, device and precision as the server reports them (GET /model)."""
    import httpx

    return httpx.get(f"{url}/model", timeout=30).raise_for_status().json()["runtime"]


def served_throughput(url: str, blobs: list[bytes], clients: int, processes: int, warmup: float,
                      seconds: float, accept: str = ACCEPT["json"], images: int = 1) -> dict:
    """C closed-loop clients (bench/loadgen.py) over `processes` client processes, `images` per request."""
    outcomes, elapsed = run_clients(url, bodies(blobs, images), clients, processes, warmup, seconds, accept)
    latencies = np.array([latency for status, latency in outcomes if status == "200"]) * 1000
    failures = Counter(status for status, _ in outcomes if status != "200")
    return {"served_images_per_s": len(latencies) * images / elapsed, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "requests": len(latencies), "failures": dict(failures)}


def server_metrics(url: str) -> dict:
    """Averages from the service's own metrics: where the time of a served image went."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name.startswith("barlow_") and sample.name.endswith(("_sum", "_count")):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value

    def mean(name: str, scale: float = 1.0) -> float:
        return round(totals.get(f"{name}_sum", 0.0) / max(totals.get(f"{name}_count", 0.0), 1.0) * scale, 2)

    return {"mean_batch": mean("barlow_batch_size"), "mean_inference_ms": mean("barlow_inference_seconds", 1000),
            "mean_preprocess_ms": mean("barlow_preprocess_seconds", 1000)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="an exported MODEL_DIR (default: export a random one)")
    parser.add_argument("--arch", default="resnet18", help="for the random model (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="for the random model (default %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="C concurrent clients (default %(default)s)")
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="images in each /embed request (default %(default)s)")
    parser.add_argument("--batch", type=int, default=0, help="B for the raw measurement (default: C)")
    parser.add_argument("--seconds", type=float, default=20, help="each measurement (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=5, help="served warm-up, not counted (default %(default)s)")
    parser.add_argument("--workers", type=int, default=0,
                        help="Embedder (HTTP) worker processes (default 0: the server's own, usable CPUs - 1)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes the C clients are spread over (default %(default)s)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server, e.g. BARLOW_THREADS=4 (repeatable)")
    parser.add_argument("--response-format", choices=sorted(ACCEPT), default="json",
                        help="what the clients ask /embed for: JSON floats or .npy (default %(default)s)")
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record")
    args = parser.parse_args()
    batch = args.batch or args.clients
    load_at_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        model_dir = args.model_dir or random_model(Path(tmp), args.arch, args.image_size)
        info = json.loads((resolve_model_dir(model_dir) / "model.json").read_text())
        raw_before, raw_mixed, providers = raw_throughput(model_dir, batch, args.seconds)
        print(f"raw ONNX Runtime ({providers[0]}): {raw_before:.1f} images/s at batch {batch}", flush=True)
        # Capacity, not shedding: admission control admits every client's request (C x N images in
        # flight), or clients that retry a 503 at once measure an overload storm (bench/load.py's part).
        env = {"BENTOML_HOME": str(Path(tmp) / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
               "BARLOW_MAX_BATCH": str(max(batch, args.clients)), "BARLOW_WORKERS": str(args.workers),
               "BARLOW_MAX_INFLIGHT_IMAGES": str(max(args.clients * args.images_per_request, 2 * max(batch, args.clients))),
               "BARLOW_MAX_QUEUE_MS": "0",
               **dict(item.split("=", 1) for item in args.server_env)}
        server = start_server(model_dir, env=env, log_file=Path(tmp) / "server.log")
        try:
            runtime = server_runtime(server.url)
            served = served_throughput(server.url, jpegs(64, info["image_size"]), args.clients,
                                       args.client_processes, args.warmup, args.seconds,
                                       ACCEPT[args.response_format], args.images_per_request)
            served["server"] = server_metrics(server.url)
        finally:
            server.stop()
            if args.log:
                shutil.copy(server.log_path, args.log)
        # Raw again once the server is gone: on a noisy machine one raw figure can be low by a third, which
        # flatters served/raw; the ratio takes the faster of the two.
        raw_after, _, _ = raw_throughput(model_dir, batch, args.seconds, mixed=False)
        raw = max(raw_before, raw_after)

    device = device_label(gpu_available())
    record = {
        "device": device,
        "commit": commit(),
        "raw_images_per_s": round(raw, 1),
        "raw_images_per_s_before_after": [round(raw_before, 1), round(raw_after, 1)],
        "raw_mixed_batches_images_per_s": round(raw_mixed, 1),
        "served_images_per_s": round(served["served_images_per_s"], 1),
        "served_over_raw": round(served["served_images_per_s"] / raw, 3),
        "p50_ms": round(served["p50_ms"], 1),
        "p99_ms": round(served["p99_ms"], 1),
        "clients": args.clients,
        "images_per_request": args.images_per_request,
        "batch": batch,
        "workers": Settings(workers=args.workers).http_workers(),
        "client_processes": args.client_processes,
        "model": {"arch": info["arch"], "image_size": info["image_size"], "dim": info["dim"]},
        "provider": runtime["provider"],  # the server's /model: what ran, not what was expected
        "precision": runtime["precision"],
        "providers": providers,  # the raw measurement's session
        "response_format": args.response_format,
        **serialisation_ms(),  # after the server stopped: nothing else on the cores
        "server": served["server"],
        "server_env": {k: v for k, v in env.items() if k.startswith("BARLOW_")},
        "requests": served["requests"],
        "failures": served["failures"],
        "seconds": args.seconds,
        "cpus": usable_cpus(),
        "load_average_1m_at_start": round(load_at_start, 2),  # other work on the machine skews both numbers
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # one record per model and request shape: the CPU and GPU suites run several
    model = f"{info['arch']}-{info['image_size']}px" + (f"-{args.images_per_request}-per-request"
                                                        if args.images_per_request > 1 else "")
    path = args.out / f"serve-{device.lower()}-{model}-{datetime.date.today().isoformat()}.json"
    write_record(path, record)
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
