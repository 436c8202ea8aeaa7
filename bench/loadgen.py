"""The /embed load generator of the serving benchmarks (bench/serve_throughput.py, bench/load.py).

Closed loops that retry at once (no Retry-After back-off: the worst case), aiohttp with multipart bodies
built once, spread over client processes. The clients run on the same cores as the server, so their
own CPU per request is kept small: encoding a form per request, or httpx's pool (O(connections) CPU
per request), made the load generator the bottleneck on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time

BOUNDARY = "barlowloadboundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
JSON = "application/json"


def multipart(blobs: list[bytes]) -> bytes:
    """One /embed body with an `images` part per blob."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + blob + b"\r\n" for i, blob in enumerate(blobs)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def bodies(blobs: list[bytes], images: int) -> list[bytes]:
    """One body per blob, each with `images` consecutive blobs (wrapping round)."""
    return [multipart([blobs[(n + i) % len(blobs)] for i in range(images)]) for n in range(len(blobs))]


async def post(http, body: bytes, accept: str = JSON) -> str:
    """POST one body to /embed and read the whole answer: its status, or the exception's name."""
    import aiohttp

    try:
        async with http.post("/embed", data=body, headers={"Content-Type": CONTENT_TYPE, "Accept": accept}) as response:
            await response.read()
            return str(response.status)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # timeouts, refused or dropped connections count too
        return type(exc).__name__


def client_pool(url: str, clients: int):
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    return aiohttp.ClientSession(base_url=url, connector=connector, timeout=aiohttp.ClientTimeout(total=120))


async def closed_loops(url: str, payloads: list[bytes], clients: int, first: int, warmup: float,
                       seconds: float, accept: str = JSON) -> tuple[list[tuple[str, float]], float]:
    """`clients` closed loops for warm-up + seconds: (status, latency) of the requests started in the window."""
    outcomes = []
    begin = time.perf_counter()
    measure_from, measure_to = begin + warmup, begin + warmup + seconds

    async def client(n: int, http) -> None:
        while (start := time.perf_counter()) < measure_to:
            status = await post(http, payloads[n % len(payloads)], accept)
            n += clients
            if start >= measure_from:
                outcomes.append((status, time.perf_counter() - start))

    async with client_pool(url, clients) as http:
        await asyncio.gather(*(client(first + i, http) for i in range(clients)))
    return outcomes, time.perf_counter() - measure_from


def client_process(job: tuple) -> tuple[list[tuple[str, float]], float]:
    return asyncio.run(closed_loops(*job))


def run_clients(url: str, payloads: list[bytes], clients: int, processes: int, warmup: float, seconds: float,
                accept: str = JSON) -> tuple[list[tuple[str, float]], float]:
    """C closed loops spread over `processes` client processes (one asyncio loop each): every
    (status, latency) measured, and the longest measuring window in seconds."""
    shares = [clients // processes + (p < clients % processes) for p in range(processes)]
    jobs = [(url, payloads, share, sum(shares[:p]), warmup, seconds, accept) for p, share in enumerate(shares) if share]
    if len(jobs) == 1:
        results = [client_process(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(client_process, jobs)
    return [o for outcomes, _ in results for o in outcomes], max(elapsed for _, elapsed in results)
