"""Serving throughput: raw ONNX Runtime images/s at batch B and /embed images/s with C concurrent clients
each sending one JPEG per request (--images-per-request N: N), in alternating rounds, p50/p99 latency,
and served/raw, in one run. The clients are bench/loadgen.py's, on the same cores as the server, and
admission control admits them all (capacity, not shedding).

served/raw says what the HTTP path (multipart, decode, the hop to the encoder where there is one, JSON)
costs against the model alone. This machine's speed drifts by a third within minutes, so raw and served
are measured in turns (raw, served, raw, served, ..., raw): each served round is compared with the mean
of the raw rounds on either side, and the record's ratio is the median of those (every round is kept).
`provider` and `precision` are what the server's /model says runs, not what this script expects.
After the rounds, `cpu_ms` says where a request's CPU goes (the model per image in the raw sessions, the
whole server per /embed request, the server per request /embed refuses before reading a body, the clients
per request) and `served_over_raw_ceiling` what follows for any handler: with the clients on the server's
cores, served/raw cannot pass N m / (N m + refused + client) (cpu_accounting).
--response-format npy has the clients ask for .npy bodies (Accept: application/x-npy); every record also
times the server's own serialisation of a 64 x 2048 response as JSON floats and as .npy
(serving/responses.py, the functions /embed calls).
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
import threading
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from pipeline.devices import gpu_available  # noqa: E402
from pipeline.runtime import OnnxModel, resolve_model_dir  # noqa: E402
from pipeline.runtime import usable_cpus  # noqa: E402
from pipeline.serve import start_server  # noqa: E402
from serving.client import Client  # noqa: E402
from serving.responses import NPY, json_floats, npy  # noqa: E402
from serving.settings import Settings, settings_from_env  # noqa: E402

from loadgen import bodies, run_clients  # noqa: E402
from common import (RESULTS, commit, cpu_seconds, device_label, process_tree,  # noqa: E402  (puts the repo on sys.path)
                    random_model, write_record)

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


class RawSessions:
    """The sessions alone, configured as the server configures them (BARLOW_DEVICE, BARLOW_THREADS,
    BARLOW_ENCODER, BARLOW_WORKERS): as many sessions with as many threads, run side by side, each at batch B."""

    def __init__(self, model_dir: Path, batch: int, settings: Settings):
        self.count = settings.sessions_per_worker() * (settings.http_workers() if settings.encoder_place() == "worker" else 1)
        self.sessions = [OnnxModel(resolve_model_dir(model_dir), settings.device, settings.session_threads(),
                                   max_batch=batch) for _ in range(self.count)]
        self.batch, self.providers, self.threads = batch, self.sessions[0].providers, self.sessions[0].threads
        self.cpu_ms_per_image: list[float] = []
        size = self.sessions[0].image_size
        self.images = np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
        for session in self.sessions:
            session.warm_up(tuple(range(1, batch + 1)))

    def images_per_s(self, seconds: float, sizes: list[int] | None = None) -> float:
        """At batch B, or cycling through `sizes` (range(1, B + 1): as adaptive batches come); the CPU
        this process spent per image (the sessions' threads, nothing else runs) joins `cpu_ms_per_image`."""
        sizes = sizes or [self.batch]
        done = [0] * self.count
        stop = time.perf_counter() + seconds

        def run(number: int) -> None:
            while time.perf_counter() < stop:
                for size in sizes:
                    self.sessions[number](self.images[:size])
                    done[number] += size

        start, cpu = time.perf_counter(), time.process_time()
        threads = [threading.Thread(target=run, args=(number,)) for number in range(self.count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.cpu_ms_per_image.append((time.process_time() - cpu) * 1000 / max(sum(done), 1))
        return sum(done) / (time.perf_counter() - start)


def server_settings(env: dict[str, str]) -> Settings:
    """The settings the server will read (serving/settings.py) from this environment plus `env`."""
    with mock.patch.dict(os.environ, env):
        return settings_from_env()


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
    with Client(url, timeout=30) as client:
        return client.model()["runtime"]


def served_throughput(url: str, blobs: list[bytes], clients: int, processes: int, warmup: float,
                      seconds: float, accept: str = ACCEPT["json"], images: int = 1) -> dict:
    """C closed-loop clients (bench/loadgen.py) over `processes` client processes, `images` per request."""
    outcomes, elapsed = run_clients(url, bodies(blobs, images), clients, processes, warmup, seconds, accept)
    latencies = np.array([latency for status, latency in outcomes if status == "200"]) * 1000
    failures = Counter(status for status, _ in outcomes if status != "200")
    return {"served_images_per_s": len(latencies) * images / elapsed, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "requests": len(latencies), "failures": dict(failures)}


def cpu_per_request(server_pid: int, url: str, payloads: list[bytes], clients: int, seconds: float,
                    accept: str) -> dict:
    """CPU milliseconds per request of the whole server (every process of it) and of the clients (this
    process, whose raw sessions idle meanwhile), over `seconds` of C closed loops, and the statuses seen."""
    processes = process_tree(server_pid)
    server_cpu, client_cpu = cpu_seconds(processes), time.process_time()
    outcomes, _ = run_clients(url, payloads, clients, 1, 0, seconds, accept)
    count = max(len(outcomes), 1)
    return {"server": (cpu_seconds(processes) - server_cpu) * 1000 / count,
            "client": (time.process_time() - client_cpu) * 1000 / count,
            "statuses": dict(Counter(status for status, _ in outcomes))}


def cpu_accounting(raw: RawSessions, server_pid: int, url: str, payloads: list[bytes], clients: int,
                   seconds: float, images: int, accept: str, model_on_cpu: bool) -> dict:
    """Where the CPU of a served request goes, and the best served/raw any /embed handler could reach here
    (None when the model does not run on the CPU: the bound below does not hold then).

    `server_per_request_refused` is a request /embed refuses before reading its body (Accept: text/plain,
    406): uvicorn, BentoML's middleware, the routing, nothing of ours beyond that. With the model on the
    CPU and the clients on the same cores, served/raw <= N m / (N m + refused + client) for N images per
    request of m ms each: the ceiling of this HTTP stack on this machine, whatever the handler does."""
    served = cpu_per_request(server_pid, url, payloads, clients, seconds, accept)
    refused = cpu_per_request(server_pid, url, [b""], clients, seconds, "text/plain")
    if set(refused["statuses"]) != {"406"}:
        raise RuntimeError(f"/embed answered {refused['statuses']} to Accept: text/plain, not only 406")
    model = float(np.median(raw.cpu_ms_per_image))
    figures = {"model_per_image_raw": model, "server_per_request": served["server"],
               "server_per_request_refused": refused["server"], "client_per_request": served["client"]}
    ceiling = images * model / (images * model + refused["server"] + served["client"])
    return {"cpu_ms": {name: round(value, 3) for name, value in figures.items()},
            "served_over_raw_ceiling": round(ceiling, 3) if model_on_cpu else None}


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
    parser.add_argument("--seconds", type=float, default=10, help="each measurement (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="served rounds, each between two raw ones "
                        "(default %(default)s)")
    parser.add_argument("--warmup", type=float, default=5, help="served warm-up, not counted (default %(default)s)")
    parser.add_argument("--workers", type=int, default=0,
                        help="Embedder (HTTP) worker processes (default 0: the server's own choice)")
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
        # Capacity, not shedding: admission control admits every client's request (C x N images in
        # flight), or clients that retry a 503 at once measure an overload storm (bench/load.py's part).
        env = {"BENTOML_HOME": str(Path(tmp) / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
               "BARLOW_MAX_BATCH": str(max(batch, args.clients)), "BARLOW_WORKERS": str(args.workers),
               "BARLOW_MAX_INFLIGHT_IMAGES": str(max(args.clients * args.images_per_request, 2 * max(batch, args.clients))),
               "BARLOW_MAX_QUEUE_MS": "0",
               **dict(item.split("=", 1) for item in args.server_env)}
        settings = server_settings(env)
        raw_session = RawSessions(model_dir, batch, settings)
        providers = raw_session.providers
        raw_mixed = raw_session.images_per_s(args.seconds, list(range(1, batch + 1)))
        raws = [raw_session.images_per_s(args.seconds)]
        print(f"raw ONNX Runtime ({providers[0]}, {raw_session.count} x {raw_session.threads} threads): "
              f"{raws[0]:.1f} images/s at batch {batch}", flush=True)
        server = start_server(model_dir, env=env, log_file=Path(tmp) / "server.log")
        rounds = []
        try:
            runtime = server_runtime(server.url)
            blobs = jpegs(64, info["image_size"])
            for number in range(args.rounds):
                served = served_throughput(server.url, blobs, args.clients, args.client_processes,
                                           args.warmup if number == 0 else 1, args.seconds,
                                           ACCEPT[args.response_format], args.images_per_request)
                raws.append(raw_session.images_per_s(args.seconds))  # the server idles meanwhile
                served["over_raw"] = served["served_images_per_s"] / ((raws[-2] + raws[-1]) / 2)
                rounds.append(served)
                print(f"round {number + 1}: served {served['served_images_per_s']:.1f} images/s, raw "
                      f"{raws[-1]:.1f}, served/raw {served['over_raw']:.3f}", flush=True)
            server_side = server_metrics(server.url)
            accounting = cpu_accounting(raw_session, server.process.pid, server.url,
                                        bodies(blobs, args.images_per_request), args.clients, args.seconds,
                                        args.images_per_request, ACCEPT[args.response_format],
                                        runtime["provider"] == "CPUExecutionProvider")
        finally:
            server.stop()
            if args.log:
                shutil.copy(server.log_path, args.log)
        median = rounds[int(np.argsort([r["over_raw"] for r in rounds])[len(rounds) // 2])]  # the median round

    device = device_label(gpu_available())
    record = {
        "device": device,
        "commit": commit(),
        "served_over_raw": round(median["over_raw"], 3),  # the median round's
        "served_images_per_s": round(median["served_images_per_s"], 1),
        "raw_images_per_s": round(float(np.median(raws)), 1),
        "p50_ms": round(median["p50_ms"], 1),
        "p99_ms": round(median["p99_ms"], 1),
        "rounds": [{"served_images_per_s": round(r["served_images_per_s"], 1), "over_raw": round(r["over_raw"], 3),
                    "p50_ms": round(r["p50_ms"], 1), "p99_ms": round(r["p99_ms"], 1)} for r in rounds],
        "raw_images_per_s_rounds": [round(raw, 1) for raw in raws],  # before round 1, then after each
        "raw_mixed_batches_images_per_s": round(raw_mixed, 1),
        "clients": args.clients,
        "images_per_request": args.images_per_request,
        "batch": batch,
        "encoder": settings.encoder_place(),  # in the HTTP worker, or its own process
        "workers": settings.http_workers(),
        "sessions": raw_session.count,  # in all workers, as the raw figure ran them
        "session_threads": raw_session.threads,
        "client_processes": args.client_processes,
        "model": {"arch": info["arch"], "image_size": info["image_size"], "dim": info["dim"]},
        "provider": runtime["provider"],  # the server's /model: what ran, not what was expected
        "precision": runtime["precision"],
        "providers": providers,  # the raw measurement's session
        "response_format": args.response_format,
        **serialisation_ms(),  # after the server stopped: nothing else on the cores
        "server": server_side,
        **accounting,  # cpu_ms and served_over_raw_ceiling
        "server_env": {k: v for k, v in env.items() if k.startswith("BARLOW_")},
        "requests": sum(r["requests"] for r in rounds),
        "failures": dict(sum((Counter(r["failures"]) for r in rounds), Counter())),
        "seconds": args.seconds,
        "cpus": usable_cpus(),
        "load_average_1m_at_start": round(load_at_start, 2),  # other work on the machine skews both numbers
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # one record per model and request shape: the CPU and GPU suites run several
    model = f"{info['arch']}-{info['image_size']}px" + (f"-{args.images_per_request}-per-request"
                                                        if args.images_per_request > 1 else "")
    if "BARLOW_ENCODER" in env:  # a placement asked for, not the device's default
        model += f"-encoder-{env['BARLOW_ENCODER']}"
    path = args.out / f"serve-{device.lower()}-{model}-{datetime.date.today().isoformat()}.json"
    write_record(path, record)
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
