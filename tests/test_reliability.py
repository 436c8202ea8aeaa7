"""Serving reliability through a real `barlow serve` (bentoml serve).

One server with a small admission limit (4 images in flight) and a 2 s body deadline, its encoder in
the HTTP worker (the CPU default), serves the module, and one with its encoder in its own process (the
GPU default) the encoder kill: a flood gets fast JSON 503s with Retry-After and correct 200s; a full worker answers 503
before the body arrives and keeps the connection; 256 slow-loris connections
do not starve /embed and trickled bodies get 408; /docs.json documents every route and schemathesis
finds no 5xx and no response off the schema; a SIGKILLed Encoder and a SIGKILLed Embedder worker are
replaced by BentoML's supervisor (the worker reloads its own encoder) and the service is ready and
correct again. The kill tests run last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.data.preprocess import load_array
from pipeline.serve import PROJECT_ROOT, free_port, wait_ready

from helpers_serving import encode, exported_model, photo, torch_embed, torch_reference

pytestmark = pytest.mark.slow

MAX_INFLIGHT = 4
BODY_TIMEOUT_S = 2
TOLERANCE = 1e-4  # the export's parity tolerance, relative to the largest output
IMAGES = [encode(photo(300 + i), "JPEG", quality=90) for i in range(16)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return exported_model(tmp_path_factory.mktemp("reliability"), "rel")


@pytest.fixture(scope="module")
def wanted(model) -> np.ndarray:
    return torch_embed(torch_reference(model[0]), np.stack([load_array(blob, 32) for blob in IMAGES]))


def serve(model, tmp, **extra_env: str):
    """`barlow serve` (the CLI, as users run it) with a small admission limit and body deadline."""
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "BARLOW_MAX_INFLIGHT_IMAGES": str(MAX_INFLIGHT), "BARLOW_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), **extra_env}
    env.pop("BARLOW_API_TOKEN", None)
    port = free_port()
    log = open(tmp / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(model[1]), "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, 120)
        yield url, process, tmp / "serve.log"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """The CPU default: the encoder in the HTTP worker."""
    yield from serve(model, tmp_path_factory.mktemp("rel-server"))


@pytest.fixture(scope="module")
def process_server(model, tmp_path_factory):
    """The GPU default, here on the CPU: the encoder in its own process (BatchedModel)."""
    yield from serve(model, tmp_path_factory.mktemp("rel-process-server"), BARLOW_ENCODER="process")


def post_embed(url: str, i: int, timeout: float = 60) -> tuple[int | str, float, httpx.Response | None]:
    """One single-image /embed on a fresh connection: (status or exception name, seconds, response)."""
    start = time.monotonic()
    try:
        response = httpx.post(f"{url}/embed", files=[("images", (f"{i}.jpg", IMAGES[i % len(IMAGES)]))],
                              data={"normalize": "false"}, timeout=timeout)
        return response.status_code, time.monotonic() - start, response
    except httpx.HTTPError as exc:
        return type(exc).__name__, time.monotonic() - start, None


def assert_correct(response: httpx.Response, wanted: np.ndarray, i: int) -> None:
    got = np.asarray(response.json()["embeddings"], dtype=np.float32)
    want = wanted[i % len(IMAGES)][None]
    assert got.shape == want.shape and np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def assert_json_503(response: httpx.Response) -> None:
    body = response.json()
    assert set(body) == {"error", "reason", "index"} and body["index"] is None and "retry" in body["error"]
    assert int(response.headers["retry-after"]) >= 1


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_overload_is_a_fast_json_503_and_admitted_requests_are_correct(server, wanted):
    url = server[0]
    shed_before = metric(url, "barlow_shed_requests_total", reason="in_flight_limit")

    async def flood(count: int) -> list[tuple[int, float, httpx.Response]]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            async def one(i: int):
                start = time.monotonic()
                response = await http.post("/embed", files=[("images", (f"{i}.jpg", IMAGES[i % len(IMAGES)]))],
                                           data={"normalize": "false"})
                return response.status_code, time.monotonic() - start, response
            return await asyncio.gather(*(one(i) for i in range(count)))

    results = asyncio.run(flood(96))
    statuses = [status for status, _, _ in results]
    assert set(statuses) == {200, 503}, statuses  # 96 at once against 4 slots: both outcomes, nothing else
    for i, (status, seconds, response) in enumerate(results):
        if status == 200:
            assert_correct(response, wanted, i)
        else:
            assert_json_503(response)
            assert seconds < 1.0, f"a rejection took {seconds:.2f} s: it queued instead of failing fast"
    assert metric(url, "barlow_shed_requests_total", reason="in_flight_limit") - shed_before == statuses.count(503)
    assert metric(url, "barlow_in_flight_images") == 0
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


def multipart(blobs: list[bytes]) -> bytes:
    parts = [b'--b\r\nContent-Disposition: form-data; name="images"; filename="x.jpg"\r\n\r\n' + blob + b"\r\n"
             for blob in blobs]
    return b"".join(parts) + b"--b--\r\n"


def read_response(sock: socket.socket, data: bytes = b"") -> tuple[bytes, bytes]:
    """One whole HTTP/1.1 response (head and Content-Length body) from `sock`, and the bytes read past it."""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def test_a_full_worker_answers_503_before_the_body_and_keeps_the_connection(server, wanted):
    """While 64-image requests keep the worker over its 4-image limit, a request whose body has not
    arrived gets its JSON 503 at once (the gate does not wait for or parse the body); the client then
    finishes sending and reuses the same connection: uvicorn discarded the rest, nothing was reset."""
    url = server[0]
    port = int(url.rsplit(":", 1)[1])
    big = [("images", (f"{i}.jpg", IMAGES[i % len(IMAGES)])) for i in range(64)]
    stop, big_statuses = threading.Event(), []

    def keep_full() -> None:
        while not stop.is_set():
            big_statuses.append(httpx.post(f"{url}/embed", files=big, timeout=60).status_code)

    body = multipart(IMAGES[:2])
    head = (f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    fillers = [threading.Thread(target=keep_full) for _ in range(2)]
    for thread in fillers:
        thread.start()
    answer, seconds = b"", None
    try:
        for _ in range(40):  # until one probe lands while the worker is full
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(head + body[:100])
                sock.settimeout(0.5)
                start = time.monotonic()
                try:
                    answer = sock.recv(65536)
                except TimeoutError:  # not full when it arrived: it waits for its body; try again
                    continue
                seconds = time.monotonic() - start
                sock.settimeout(30)
                answer, early = read_response(sock, answer)  # its head and body may come in separate reads
                assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
                sock.sendall(body[100:] + b"GET /model HTTP/1.1\r\nHost: x\r\n\r\n")
                following, _ = read_response(sock, early)
                assert following.startswith(b"HTTP/1.1 200"), following[:300]
                break
    finally:
        stop.set()
        for thread in fillers:
            thread.join()
    assert seconds is not None, "no probe arrived while 64-image requests filled the worker"
    assert seconds < 0.5
    head_part, _, json_part = answer.partition(b"\r\n\r\n")
    assert b"retry-after: 1" in head_part.lower()
    reply = json.loads(json_part)
    assert reply["index"] is None and "at capacity" in reply["error"]
    assert 200 in big_statuses and set(big_statuses) <= {200, 503}
    assert metric(url, "barlow_request_seconds_count", route="/embed", status="503") >= 1
    assert metric(url, "barlow_in_flight_images") == 0


def test_slow_loris_connections_do_not_starve_embed_and_slow_bodies_get_408(server, wanted):
    url = server[0]
    port = int(url.rsplit(":", 1)[1])
    head = b"POST /embed_base64 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    trickling_heads, trickling_bodies = [], []
    try:
        for _ in range(128):  # headers never finish: no uvicorn timer covers them
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head)
            trickling_heads.append(sock)
        for _ in range(128):  # headers done, then a body that never finishes: our deadline covers it
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head + b"Content-Length: 100000\r\n\r\n{")
            trickling_bodies.append(sock)
        started = time.monotonic()
        for i in range(8):
            for sock in trickling_heads[i::8]:
                sock.sendall(b"X-Slow: 1\r\n")
            status, seconds, response = post_embed(url, i, timeout=30)
            assert status == 200, (status, response.text if response else "")
            assert_correct(response, wanted, i)
            assert seconds < 10, f"/embed took {seconds:.1f} s with 256 slow connections held"
        time.sleep(max(0.0, BODY_TIMEOUT_S + 1 - (time.monotonic() - started)))
        for sock in trickling_bodies[:16]:
            sock.settimeout(30)
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["index"] is None and "did not arrive within" in body["error"]
        heads_open = sum(1 for sock in trickling_heads if not sock.sendall(b"X-Slow: 2\r\n"))
        assert heads_open == len(trickling_heads), "header trickles stay open (see serving/limits.py)"
    finally:
        for sock in trickling_heads + trickling_bodies:
            sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # a head that keeps growing
        sock.sendall(b"GET /model HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(5):  # 20 KiB, no end of head
            time.sleep(0.05)  # separate reads, so the head is incomplete after each
            sock.sendall(b"a" * 4096)
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")  # over 16 KiB of an incomplete head (serving/http_protocol.py)
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


def test_docs_json_documents_every_route_and_schemathesis_finds_no_5xx(server, tmp_path):
    url = server[0]
    document = httpx.get(f"{url}/docs.json", timeout=10).json()
    for path, method in [("/embed", "post"), ("/embed_base64", "post"), ("/search", "post"), ("/model", "get"),
                         ("/readyz", "get"), ("/livez", "get"), ("/metrics", "get")]:
        assert method in document["paths"][path], path
    assert {"400", "408", "413", "415", "422", "503"} <= set(document["paths"]["/embed"]["post"]["responses"])
    assert "Retry-After" in document["paths"]["/embed"]["post"]["responses"]["503"]["headers"]
    report = tmp_path / "schemathesis.json"
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
              "response_schema_conformance,negative_data_rejection")
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/docs.json", "--checks", checks, "-n", "10",
         "-w", "1", "--seed", "1", "--generation-database", "none", "--no-color", "--report", "json",
         "--report-json-path", str(report)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    record = json.loads(report.read_text())
    assert record["operations"]["tested"] >= 8 and record["test_cases"]["generated"] >= 40
    assert record["failures"] == [] and record["errors"] == []


def server_worker(process: subprocess.Popen, service: str) -> psutil.Process:
    """The BentoML worker process of `service` under `barlow serve` (barlow -> bentoml -> workers)."""
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "_bentoml_impl.worker.service" in command and service in command:  # --service-name NAME
            return child
    raise AssertionError(f"no {service} worker under {process.pid}")


def replaced(process: subprocess.Popen, service: str, victim: psutil.Process) -> bool:
    try:
        return server_worker(process, service).pid != victim.pid
    except AssertionError:  # between the kill and the restart
        return False


def checked(response: httpx.Response, wanted: np.ndarray, i: int) -> int | str:
    """The status, or what was wrong with a 200 or 503 (asserts cannot leave the client threads)."""
    try:
        if response.status_code == 200:
            assert_correct(response, wanted, i)
        elif response.status_code == 503:
            assert_json_503(response)
    except (AssertionError, ValueError, KeyError):
        return f"malformed {response.status_code}: {response.text[:200]}"
    return response.status_code


def kill_and_watch(server, wanted, service: str) -> dict:
    """SIGKILL one worker under load from 4 clients; wait until a new one serves correct 200s again."""
    url, process, log = server
    victim = server_worker(process, service)
    outcomes: list[tuple[float, int | str, float]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = n
        while not stop.is_set():
            start = time.monotonic()
            status, seconds, response = post_embed(url, i, timeout=60)
            outcomes.append((start, checked(response, wanted, i) if response else status, seconds))
            i += 4
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    ready_at = None
    not_ready = 0
    try:
        while time.monotonic() - killed_at < 90:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=10).status_code
            except httpx.HTTPError:
                ready = None
            not_ready += ready != 200
            if ready == 200 and replaced(process, service, victim) and time.monotonic() - killed_at > 1:
                ready_at = time.monotonic()
                break
            time.sleep(0.2)
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert ready_at is not None, f"{service} was not replaced and ready within 90 s: {log.read_text()[-3000:]}"
    assert process.poll() is None
    after = [o for o in outcomes if o[0] > ready_at]
    assert after and all(status == 200 for _, status, _ in after), after
    return {"killed_at": killed_at, "ready_after_s": ready_at - killed_at, "outcomes": outcomes,
            "readyz_not_ready": not_ready}


def test_killed_encoder_is_replaced_and_requests_in_the_gap_get_200_or_json_503(process_server, wanted):
    watched = kill_and_watch(process_server, wanted, "barlow-batched-model")
    # Requests during the gap either waited for the new encoder (its socket stays open in BentoML's
    # supervisor) and got a correct 200, or a JSON 503: nothing else, and nothing hung.
    statuses = {status for _, status, _ in watched["outcomes"]}
    assert statuses <= {200, 503}, statuses
    assert max(seconds for _, _, seconds in watched["outcomes"]) < 30
    assert watched["ready_after_s"] < 60


def test_killed_embedder_worker_is_replaced_and_serves_again(server, wanted):
    watched = kill_and_watch(server, wanted, "barlow-embed")
    killed_at = watched["killed_at"]
    for start, status, seconds in watched["outcomes"]:
        if start > killed_at + 0.5:  # after the kill: the listening socket stays open, so they wait, not fail
            assert status in (200, 503), (status, start - killed_at)
            assert seconds < 30
        else:  # in flight on the killed worker: a dropped connection is all a client can get
            assert status in (200, 503, "RemoteProtocolError", "ReadError", "ConnectError"), status
