"""The /embed load generator of the serving benchmarks (bench/serve_throughput.py, bench/load.py).

Closed loops that retry at once (no Retry-After back-off: the worst case), with multipart bodies and
request heads built once, written to keep-alive connections on uvloop, spread over client processes.
The clients run on the same cores as the server, so their own CPU per request is kept small: encoding
a form per request, httpx's pool (O(connections) CPU per request) and even aiohttp's per-request
machinery took CPU from the server under test on a 2-core machine. So the loops do not use
serving/client.py's `Client` (httpx, one request at a time); the bodies are its `multipart`, the same
bytes a `Client` sends.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from urllib.parse import urlsplit

from serving.client import multipart

BOUNDARY = "barlowloadboundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
JSON = "application/json"
TIMEOUT_S = 120


def bodies(blobs: list[bytes], images: int) -> list[bytes]:
    """One /embed body (`images` parts, BOUNDARY) per blob, each with `images` consecutive JPEGs (wrapping round)."""
    return [multipart([(f"{i}.jpg", blobs[(n + i) % len(blobs)]) for i in range(images)], BOUNDARY, "image/jpeg")[0]
            for n in range(len(blobs))]


class Connections:
    """Keep-alive HTTP/1.1 connections to one server, each request written as prebuilt bytes: under the
    single-image /embed load, half the client CPU per request that aiohttp took, CPU that on a 2-core
    machine the server under test would otherwise lose to its own load generator."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.heads: dict[tuple[str, int, str], bytes] = {}

    def head(self, path: str, length: int, accept: str) -> bytes:
        key = (path, length, accept)
        if key not in self.heads:
            self.heads[key] = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                               f"Accept: {accept}\r\nContent-Length: {length}\r\n\r\n").encode()
        return self.heads[key]

    async def post(self, path: str, body: bytes, accept: str) -> int:
        """The response's status; the connection goes back to the pool unless the server closes it."""
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self.head(path, len(body), accept) + body)
            status, keep = await read_response(reader)
        except BaseException:
            writer.close()
            raise
        if keep:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return status

    async def __aenter__(self) -> "Connections":
        return self

    async def __aexit__(self, *exc) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one whole response (Content-Length or chunked body): its status and whether the connection stays open."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    return status, headers.get("connection") != "close"


async def post(http: Connections, body: bytes, accept: str = JSON) -> str:
    """POST one body to /embed and read the whole answer: its status, or the exception's name."""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            return str(await http.post("/embed", body, accept))
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
        return type(exc).__name__  # refused, dropped or timed-out requests count too


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

    async with Connections(url) as http:  # a loop opens a connection when none is idle
        await asyncio.gather(*(client(first + i, http) for i in range(clients)))
    return outcomes, time.perf_counter() - measure_from


def client_process(job: tuple) -> tuple[list[tuple[str, float]], float]:
    import uvloop

    return uvloop.run(closed_loops(*job))


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
