"""Load and soak a real `barlow serve` on 127.0.0.1: throughput, latency tails, errors, server RSS.

For each level C in --clients and each request shape (1 image, --multi images), C concurrent
clients post to /embed for --seconds after a short warm-up: requests sent, throughput, p50/p95/p99
latency of every request, errors by status (or exception), and the RSS of the whole server process
tree before and after. --soak N then sends N single-image requests from --soak-clients clients and
reports RSS growth after a warm-up (the first 10 %) and the count of 5xx. --overload C adds single-image
levels beyond capacity, where admission control (BARLOW_MAX_INFLIGHT_IMAGES, lowered to keep the wait
near BARLOW_MAX_QUEUE_MS) must answer the excess with fast 503s: latency is reported per status.
The server runs with the service defaults (BARLOW_* unset). Merges "load" and "soak" into
bench/results/reliability-<date>.json.

Clients are bench/loadgen.py's closed loops (retry at once, keep-alive connections, bodies built
once), spread over --client-processes processes on the same cores as the server. Each
level also records "server_side": the server's own barlow_request_seconds histogram over the level
(bucket bounds of p50/p99 per status), so the server's time is told apart from the load generator's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from loadgen import Connections, bodies, post, run_clients  # noqa: E402
from serve_throughput import jpegs, server_runtime  # noqa: E402

from pipeline.serve import start_server  # noqa: E402

from common import RESULTS, commit, device_label, merge_record, process_tree, random_model  # noqa: E402  (puts the repo on sys.path)


def server_rss_mb(pid: int) -> float:
    """RSS of the server and all its children (BentoML's manager plus one process per service)."""
    import psutil

    total = 0
    for process in process_tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that exits between listing and reading
            pass
    return round(total / 2**20, 1)


def percentiles(latencies: list[float]) -> dict:
    ms = np.array(latencies) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 99)} | {"max_ms": round(float(ms.max()), 1)}


def histogram(url: str) -> dict[tuple[str, float], float]:
    """barlow_request_seconds buckets of /embed from the server's /metrics: {(status, le): count}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    buckets = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples:
            if sample.name == "barlow_request_seconds_bucket" and sample.labels.get("route") == "/embed":
                buckets[sample.labels["status"], float(sample.labels["le"])] += sample.value
    return buckets


def server_latency(before: dict, after: dict) -> dict:
    """Per status, from the server's histogram (bucket deltas over the level): count and the bucket
    bounds p50/p99 fall under; time from the app seeing a request to its last response byte."""
    result = {}
    for status in sorted({status for status, _ in after}):
        cumulative = sorted((le, after[status, le] - before.get((status, le), 0)) for s, le in after if s == status)
        count = cumulative[-1][1]
        if count:
            bound = {q: next(le for le, n in cumulative if n >= q / 100 * count) for q in (50, 99)}
            result[status] = {"count": int(count), **{f"p{q}_ms_at_most": round(b * 1000, 1) for q, b in bound.items()}}
    return result


def summary(latencies: list[float], statuses: Counter, seconds: float, images: int,
            by_status: dict[str, list[float]] | None = None) -> dict:
    """The figures of one measurement; latencies in seconds, of every request (errors included)."""
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    sent, ok = sum(statuses.values()), statuses.get("200", 0)
    per_status = {"latency_by_status": {k: percentiles(v) for k, v in sorted(by_status.items())}} if by_status else {}
    return {**per_status, "requests_sent": sent, "ok": ok, "errors_by_status": {k: v for k, v in sorted(statuses.items()) if k != "200"},
            "throughput_rps": round(ok / seconds, 1), "images_per_s": round(ok * images / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
            "seconds": round(seconds, 1)}


def level(url: str, blobs: list[bytes], clients: int, images: int, warmup: float, seconds: float,
          processes: int = 1) -> dict:
    """C clients in closed loops, spread over `processes` client processes (one asyncio loop each)."""
    outcomes, elapsed = run_clients(url, bodies(blobs, images), clients, processes, warmup, seconds)
    latencies, statuses, by_status = [], Counter(), {}
    for status, latency in outcomes:
        latencies.append(latency)
        statuses[status] += 1
        by_status.setdefault(status, []).append(latency)
    return summary(latencies, statuses, elapsed, images, by_status)


async def soak(url: str, pid: int, blobs: list[bytes], clients: int, total: int) -> dict:
    """`total` single-image requests; RSS sampled every 5 % of them, growth measured from the 10 % mark."""
    latencies, statuses, rss = [], Counter(), {0: server_rss_mb(pid)}
    payloads = bodies(blobs, 1)
    step = max(total // 20, 1)
    sent = 0

    async def client(http) -> None:
        nonlocal sent
        while sent < total:
            sent += 1
            number = sent
            start = time.perf_counter()
            statuses[await post(http, payloads[number % len(payloads)])] += 1
            latencies.append(time.perf_counter() - start)
            if number % step == 0:
                rss[number] = server_rss_mb(pid)

    begin = time.perf_counter()
    async with Connections(url) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    result = summary(latencies, statuses, time.perf_counter() - begin, 1)
    rss[total] = server_rss_mb(pid)
    warm = rss[min(k for k in rss if k >= total // 10)]
    server_errors = sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500)
    return {**result, "clients": clients, "rss_mb_by_requests": {str(k): v for k, v in sorted(rss.items())},
            "rss_after_warmup_mb": warm, "rss_end_mb": rss[total],
            "rss_growth_after_warmup_pct": round((rss[total] - warm) / warm * 100, 2), "server_5xx": server_errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128], help="levels C (default 8 32 128)")
    parser.add_argument("--multi", type=int, default=8, help="images per multi-image request (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=30, help="T per level (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=3, help="per level, not measured (default %(default)s)")
    parser.add_argument("--overload", type=int, nargs="*", default=[256],
                        help="single-image levels beyond capacity, after the others (default 256)")
    parser.add_argument("--soak", type=int, default=0, help="soak requests after the levels (0: none; issue: 20000)")
    parser.add_argument("--soak-clients", type=int, default=32, help="clients of the soak (default %(default)s)")
    parser.add_argument("--client-processes", type=int, default=2,
                        help="load-generator processes the clients of a level are spread over (default %(default)s)")
    parser.add_argument("--model-dir", type=Path, help="an exported MODEL_DIR (default: export a random one)")
    parser.add_argument("--arch", default="resnet18", help="for the random model (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="for the random model (default %(default)s)")
    parser.add_argument("--note", default="", help="a remark stored in the record (e.g. 'machine shared')")
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record")
    args = parser.parse_args()

    blobs = jpegs(64, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or random_model(Path(tmp), args.arch, args.image_size)
        env = {"BENTOML_HOME": str(Path(tmp) / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
        server = start_server(model_dir, env=env, log_file=args.log or Path(tmp) / "server.log")
        try:
            pid = server.process.pid
            runtime = server_runtime(server.url)  # what the encoder runs, as the server reports it
            rss_start = server_rss_mb(pid)
            levels = []
            for clients in args.clients:
                for images in (1, args.multi):
                    before, buckets = server_rss_mb(pid), histogram(server.url)
                    result = level(server.url, blobs, clients, images, args.warmup, args.seconds, args.client_processes)
                    levels.append({"clients": clients, "images_per_request": images, **result,
                                   "server_side": server_latency(buckets, histogram(server.url)),
                                   "rss_start_mb": before, "rss_end_mb": server_rss_mb(pid),
                                   "load_average_1m": round(os.getloadavg()[0], 1)})
                    print(json.dumps(levels[-1]), flush=True)
            for clients in args.overload:
                before, buckets = server_rss_mb(pid), histogram(server.url)
                result = level(server.url, blobs, clients, 1, args.warmup, args.seconds, args.client_processes)
                levels.append({"clients": clients, "images_per_request": 1, "overload": True, **result,
                               "server_side": server_latency(buckets, histogram(server.url)),
                               "rss_start_mb": before, "rss_end_mb": server_rss_mb(pid),
                               "load_average_1m": round(os.getloadavg()[0], 1)})
                print(json.dumps(levels[-1]), flush=True)
            soaked = asyncio.run(soak(server.url, pid, blobs, args.soak_clients, args.soak)) if args.soak else None
            alive = server.process.poll() is None
            rss_end = server_rss_mb(pid) if alive else None
        finally:
            exit_code = server.stop()
    where = {"device": device_label(False), "commit": commit(), "cpus": os.cpu_count(),
             "load_average_1m_at_end": round(os.getloadavg()[0], 1),
             "model": {"arch": args.arch, "image_size": args.image_size},
             "provider": runtime["provider"], "precision": runtime["precision"],
             "server": "barlow serve on 127.0.0.1, service defaults",
             "clients": f"keep-alive closed loops (bench/loadgen.py) in {args.client_processes} asyncio processes on the same machine",
             "note": args.note, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    record_path = args.out / f"reliability-{datetime.date.today().isoformat()}.json"
    merge_record(record_path, "load", {**where, "seconds_per_level": args.seconds, "levels": levels,
                                       "server_rss_start_mb": rss_start, "server_rss_end_mb": rss_end,
                                       "server_alive_at_end": alive, "server_exit": exit_code})
    if soaked:
        merge_record(record_path, "soak", {**where, **soaked})
        print(json.dumps(soaked), flush=True)
    # A 503 is the admission answer beyond capacity: a failure only when the server was slow to give it,
    # i.e. the request queued before it was turned away (server-side: the client shares the cores).
    server_errors = sum(v for lv in levels for k, v in lv["errors_by_status"].items()
                        if k.isdigit() and int(k) >= 500 and k != "503")
    server_errors += sum(1 for lv in levels if lv["server_side"].get("503", {}).get("p99_ms_at_most", 0) > 1000)
    return 0 if alive and server_errors == 0 and (not soaked or soaked["server_5xx"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
