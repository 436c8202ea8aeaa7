"""The /embed service through a real `bentoml serve` subprocess on a free 127.0.0.1 port.

One server (token auth on, small limits) serves the module; the SIGTERM test starts its own through
`barlow serve` (auth off) because it shuts it down. Bento build is tested from a copy of the project.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pipeline.data.preprocess import load_array
from pipeline.errors import UserError
from pipeline.runtime import OnnxModel, resolve_model_dir, usable_cpus
from pipeline.serve import PROJECT_ROOT, free_port, start_server, wait_ready
from serving.responses import decode_base64_body

from helpers_serving import (encode, exported_model, log_tail, photo, sample_images, served, torch_embed,
                             torch_reference)

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
MAX_IMAGES = 8
MAX_PIXELS = 1_000_000
TOLERANCE = 1e-4  # the export's parity tolerance, relative to the largest output


def bentoml_env(tmp: Path) -> dict[str, str]:
    return {"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return exported_model(tmp_path_factory.mktemp("serve"), "serve")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    # BARLOW_PAD_BATCHES=1: the GPU path (batches padded to bucket shapes) runs here on the CPU too.
    yield from served(model[1], tmp_path_factory.mktemp("server"), BARLOW_API_TOKEN=TOKEN,
                      BARLOW_MAX_IMAGES=str(MAX_IMAGES), BARLOW_MAX_PIXELS=str(MAX_PIXELS), BARLOW_MAX_BATCH="32",
                      BARLOW_PAD_BATCHES="1")


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def reference(model):
    return torch_reference(model[0])


def embed(http: httpx.Client, images: list[tuple[str, bytes]], **data) -> httpx.Response:
    return http.post("/embed", files=[("images", (name, blob, "application/octet-stream")) for name, blob in images],
                     data=data)


def expected(reference, images: list[tuple[str, bytes]]) -> np.ndarray:
    return torch_embed(reference, np.stack([load_array(blob, 32) for _, blob in images]))


def assert_close(actual, wanted) -> None:
    actual, wanted = np.asarray(actual, dtype=np.float32), np.asarray(wanted, dtype=np.float32)
    assert actual.shape == wanted.shape
    assert np.abs(actual - wanted).max() <= TOLERANCE * np.abs(wanted).max()


def embed_at_once(url: str, payloads: list[list[tuple[str, bytes]]], token: str | None = None) -> list[httpx.Response]:
    """One request per payload, all released together (a barrier), so they share encoder batches."""
    barrier = threading.Barrier(len(payloads))
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def send(payload: list[tuple[str, bytes]]) -> httpx.Response:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            barrier.wait()
            return embed(http, payload, normalize="false")

    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(send, payloads))


def metric_values(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    text = http.get("/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_embeddings_match_the_torch_encoder_for_every_format(client, reference):
    images = sample_images()  # JPEG, PNG, WebP, RGBA, BMP, TIFF, GIF, EXIF-rotated, CMYK, 16-bit
    for chunk in (images[:MAX_IMAGES], images[MAX_IMAGES:]):
        response = embed(client, chunk, normalize="false")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "run-serve-resnet18" and body["dim"] == 512
        assert_close(body["embeddings"], expected(reference, chunk))  # in request order
    normalized = np.array(embed(client, images[:3]).json()["embeddings"])  # normalize defaults to true
    assert np.allclose(np.linalg.norm(normalized, axis=1), 1, atol=1e-5)
    raw = expected(reference, images[:3])
    assert_close(normalized, raw / np.linalg.norm(raw, axis=1, keepdims=True))
    as_base64 = client.post("/embed_base64", json={
        "images": [base64.b64encode(blob).decode() for _, blob in images[:3]], "normalize": False})
    assert as_base64.status_code == 200, as_base64.text
    assert_close(as_base64.json()["embeddings"], raw)


def test_concurrent_requests_share_adaptive_batches_and_keep_their_own_results(client, server, reference):
    images = [(f"{i}.jpg", encode(photo(100 + i), "JPEG", quality=90)) for i in range(16)]
    wanted = expected(reference, images)
    before = metric_values(client)
    barrier = threading.Barrier(len(images))

    def one(i: int) -> list[float]:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            barrier.wait()
            results = []
            for _ in range(3):
                response = embed(http, [images[i]], normalize="false")
                assert response.status_code == 200, response.text
                results.append(response.json()["embeddings"][0])
            return results

    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(one, range(len(images))))
    for i, per_client in enumerate(results):
        for embedding in per_client:
            assert_close([embedding], wanted[i : i + 1])  # each client got its own image's embedding
    after = metric_values(client)

    def delta(metric: str, /, **labels) -> float:
        def total(values):
            return sum(v for (n, l), v in values.items() if n == metric and labels.items() <= dict(l).items())
        return total(after) - total(before)

    # The worker merges concurrent requests into batches of its own encoder (serving/microbatch.py,
    # ThreadBatcher): 48 requests, fewer batches, every image in one of them.
    batches = delta("barlow_batch_size_count")
    assert delta("barlow_batch_size_sum") == 48 and 0 < batches < 48, "concurrent requests were merged into batches"
    assert delta("barlow_images_embedded_total") == 48


def big_png(width: int, height: int) -> bytes:
    return encode(Image.new("1", (width, height)), "PNG")  # a few kB, width x height pixels


GOOD = ("good.jpg", encode(photo(1), "JPEG"))
JPEG = encode(photo(2, size=(300, 200)), "JPEG", quality=95)
BAD_INPUTS = {
    # name: (request kwargs for httpx, status, index)
    "text-bytes": ({"files": [("images", ("a.jpg", b"this is not an image"))]}, 400, 0),
    "zero-byte-part": ({"files": [("images", ("a.jpg", b""))]}, 400, 0),
    "truncated-jpeg": ({"files": [("images", ("a.jpg", JPEG[: len(JPEG) // 2]))]}, 400, 0),
    "corrupt-png": ({"files": [("images", ("a.png", encode(photo(3), "PNG")[:60] + bytes(range(256)) * 8))]}, 400, 0),
    "bad-second-of-three": ({"files": [("images", GOOD), ("images", ("b.jpg", b"junk")), ("images", GOOD)]}, 400, 1),
    "above-max-pixels": ({"files": [("images", ("big.png", big_png(2000, 1000)))]}, 413, 0),
    # Above twice Image.MAX_IMAGE_PIXELS (the service sets it to the limit): Pillow's own bomb error.
    "decompression-bomb": ({"files": [("images", ("bomb.png", big_png(3000, 1000)))]}, 413, 0),
    "too-many-images": ({"files": [("images", GOOD)] * (MAX_IMAGES + 1)}, 413, None),
    "far-too-many-images": ({"files": [("images", GOOD)] * (MAX_IMAGES + 20)}, 413, None),
    "no-images": ({"files": [("normalize", (None, "true"))]}, 422, None),
    "wrong-field-name": ({"files": [("image", ("a.jpg", GOOD[1]))]}, 422, None),
    "images-as-text-field": ({"files": [("images", (None, "http://169.254.169.254/latest"))]}, 422, 0),  # no fetch
    "bad-normalize": ({"files": [("images", GOOD)], "data": {"normalize": "maybe"}}, 422, None),
    "json-to-multipart-route": ({"json": {"images": []}}, 415, None),
    "malformed-multipart": ({"content": b"abc", "headers": {"content-type": "multipart/form-data; boundary=x"}},
                            400, None),
}
BAD_BASE64 = {
    "invalid-base64": ({"json": {"images": ["not*base64!"]}}, 400, 0),
    "base64-of-non-image": ({"json": {"images": [base64.b64encode(b"hello").decode()]}}, 400, 0),
    "not-json": ({"content": b"{images: nope", "headers": {"content-type": "application/json"}}, 400, None),
    "no-images-field": ({"json": {"pictures": []}}, 422, None),
    "empty-list": ({"json": {"images": []}}, 422, None),
    "number-instead-of-string": ({"json": {"images": [base64.b64encode(GOOD[1]).decode(), 7]}}, 422, 1),
    "too-many": ({"json": {"images": [base64.b64encode(GOOD[1]).decode()] * (MAX_IMAGES + 1)}}, 413, None),
}


@pytest.mark.parametrize("route,case", [("/embed", name) for name in BAD_INPUTS]
                         + [("/embed_base64", name) for name in BAD_BASE64])
def test_bad_input_gets_a_4xx_json_reason_and_the_server_stays_ready(client, route, case):
    kwargs, status, index = (BAD_INPUTS if route == "/embed" else BAD_BASE64)[case]
    response = client.post(route, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "reason", "index"} and body["index"] == index
    assert isinstance(body["error"], str) and 10 < len(body["error"]) < 300 and "\n" not in body["error"]
    assert client.get("/readyz").status_code == 200
    assert embed(client, [GOOD]).status_code == 200


def test_a_bad_image_does_not_fail_the_requests_batched_with_it(client, server, reference):
    good = [(f"{i}.png", encode(photo(200 + i), "PNG")) for i in range(8)]
    wanted = expected(reference, good)
    payloads = [[good[i // 2]] if i % 2 == 0 else [("bad.jpg", JPEG[:500])] for i in range(16)]
    responses = embed_at_once(server.url, payloads, TOKEN)
    for i, response in enumerate(responses):
        if i % 2:
            assert response.status_code == 400 and response.json()["index"] == 0
        else:
            assert response.status_code == 200, response.text
            assert_close(response.json()["embeddings"], wanted[i // 2 : i // 2 + 1])


def test_token_guards_embedding_routes_but_not_probes_or_metrics(server):
    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = anonymous.post("/embed", files=[("images", GOOD)], headers=headers)
            assert response.status_code == 401 and "bearer token" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
            b64 = anonymous.post("/embed_base64", json={"images": [base64.b64encode(GOOD[1]).decode()]},
                                 headers=headers)
            assert b64.status_code == 401
        for path in ("/readyz", "/livez", "/metrics", "/model"):
            assert anonymous.get(path).status_code == 200, path
        page = anonymous.get("/")  # this server has no index: the page says how to add one
        assert page.status_code == 200 and "no search index" in page.text and "barlow index" in page.text
        assert anonymous.get("/thumbnail/x").status_code == 401
        authorized = anonymous.post("/embed", files=[("images", GOOD)], headers={"Authorization": f"Bearer {TOKEN}"})
        assert authorized.status_code == 200


def test_metrics_expose_the_barlow_families(client, model):
    before = metric_values(client)
    assert embed(client, [GOOD, GOOD, GOOD]).status_code == 200
    assert embed(client, [("x.jpg", b"not an image")]).status_code == 400
    after = metric_values(client)

    def value(values, metric, /, **labels):
        return sum(v for (n, l), v in values.items() if n == metric and labels.items() <= dict(l).items())

    assert value(after, "barlow_images_embedded_total") - value(before, "barlow_images_embedded_total") == 3
    reason = {"reason": "not_an_image"}
    assert value(after, "barlow_rejected_inputs_total", **reason) - value(before, "barlow_rejected_inputs_total", **reason) == 1
    for histogram in ("barlow_preprocess_seconds", "barlow_inference_seconds", "barlow_batch_size"):
        assert value(after, f"{histogram}_count") > value(before, f"{histogram}_count"), histogram
    info = json.loads((model[1] / "model.json").read_text())
    labels = {"name": "run-serve-resnet18", "sha256": info["onnx_sha256"], "dim": "512"}
    assert value(after, "barlow_model_info", **labels) == 1
    encoder = {"provider": "CPUExecutionProvider", "device": "cpu", "precision": "fp32"}  # what runs, not the wish
    assert value(after, "barlow_encoder_info", **encoder) == 1 and value(after, "barlow_encoder_info") == 1


def test_model_route_returns_model_json_and_what_runs_it(client, model):
    body = client.get("/model").json()
    info = json.loads((model[1] / "model.json").read_text())
    assert body.pop("runtime") == {"provider": "CPUExecutionProvider", "providers": ["CPUExecutionProvider"],
                                   "device": "cpu", "requested_device": "auto", "precision": "fp32",
                                   "version": info["version"], "file": "model.onnx", "sha256": info["onnx_sha256"],
                                   "encoder": "worker", "sessions": usable_cpus(), "threads": 1}  # the CPU defaults
    assert body == info


def test_npy_and_base64_responses_carry_the_json_numbers(client):
    images = [GOOD, ("b.png", encode(photo(3), "PNG"))]
    as_json = embed(client, images)
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    floats = np.array(as_json.json()["embeddings"], dtype=np.float32)
    assert floats.shape == (2, 512)
    for headers in ({"Accept": "*/*"}, {"Accept": "application/json"}):
        assert np.array_equal(np.array(client.post("/embed", files=[("images", b) for b in images],
                                                   headers=headers).json()["embeddings"], dtype=np.float32), floats)

    def npy(response: httpx.Response) -> np.ndarray:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-npy"
        assert response.headers["x-barlow-model"] == "run-serve-resnet18" and response.headers["x-barlow-dim"] == "512"
        return np.load(io.BytesIO(response.content), allow_pickle=False)

    files = [("images", image) for image in images]
    exact = npy(client.post("/embed", files=files, headers={"Accept": "application/x-npy"}))
    assert exact.dtype == np.dtype("<f4") and np.array_equal(exact, floats)
    half = npy(client.post("/embed?dtype=float16", files=files, headers={"Accept": "application/x-npy"}))
    assert half.dtype == np.dtype("<f2") and half.shape == (2, 512)
    assert np.abs(half.astype(np.float32) - floats).max() <= 1e-3
    packed = client.post("/embed?encoding=base64", files=files)
    assert packed.status_code == 200 and packed.headers["content-type"] == "application/json"
    body = packed.json()
    assert body["model"] == "run-serve-resnet18" and body["dim"] == 512 and body["dtype"] == "float32"
    assert body["shape"] == [2, 512] and np.array_equal(decode_base64_body(body), floats)
    from_base64_route = client.post("/embed_base64?encoding=base64&dtype=float16", json={
        "images": [base64.b64encode(blob).decode() for _, blob in images]})
    assert from_base64_route.status_code == 200, from_base64_route.text
    assert np.abs(decode_base64_body(from_base64_route.json()).astype(np.float32) - floats).max() <= 1e-3
    for headers, query, status in (({"Accept": "text/html"}, "", 406),
                                   ({"Accept": "application/x-npy; dtype=float16"}, "", 406),
                                   ({}, "?dtype=float16", 422),
                                   ({"Accept": "application/x-npy"}, "?encoding=base64", 422)):
        refused = client.post(f"/embed{query}", files=files, headers=headers)
        assert refused.status_code == status, refused.text
        assert set(refused.json()) == {"error", "reason", "index"} and refused.headers["content-type"] == "application/json"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_session_matches_the_torch_encoder(model, reference):
    """The GPU twin of the served-embedding test above (which runs the same OnnxModel on CPU)."""
    encoder = OnnxModel(model[1], device="cuda")
    assert encoder.providers[0] == "CUDAExecutionProvider"
    images = sample_images()
    assert_close(encoder(np.stack([load_array(blob, 32) for _, blob in images])), expected(reference, images))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("encoder", ["process", "worker"])
def test_a_device_that_is_not_there_stops_the_server_with_a_reason_and_a_non_zero_exit(model, tmp_path, encoder):
    """BARLOW_DEVICE=cuda on this CPU machine, the encoder in its own process or in the HTTP worker: never
    ready, the whole server exits non-zero at once (not restarted forever), and the log says why.
    tests/test_runtime_provider.py covers the ORT-level refusal (a GPU torch sees, a CUDA provider that
    cannot load) on the same path."""
    env = {**bentoml_env(tmp_path), "BARLOW_DEVICE": "cuda", "BARLOW_ENCODER": encoder}
    start = time.monotonic()
    with pytest.raises(UserError, match=r"the server exited with code [1-9]\d* before it was ready.*: device cuda "
                                        r"asked for, but torch sees no CUDA GPU"):
        start_server(model[1], env=env, log_file=tmp_path / "server.log", timeout=150)
    assert time.monotonic() - start < 120, "stopped, not left restarting until the timeout"
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "cannot start: device cuda asked for, but torch sees no CUDA GPU" in log, log[-3000:]
    assert log.count("Application startup failed") <= 4, "the encoder was not restarted again and again"


def test_sigterm_drains_in_flight_requests_and_barlow_serve_exits_0(model, tmp_path, reference):
    """Load from 16 clients, SIGTERM to `barlow serve`: no request that got a response failed."""
    _, model_dir = model
    port = free_port()
    env = {**os.environ, **bentoml_env(tmp_path)}
    env.pop("BARLOW_API_TOKEN", None)
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(model_dir), "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, 120)
        image = ("a.jpg", encode(photo(7), "JPEG"))
        response = httpx.post(f"{url}/embed", files=[("images", image)], data={"normalize": "false"}, timeout=60)
        assert response.status_code == 200, "auth is off without BARLOW_API_TOKEN"
        assert_close(response.json()["embeddings"], expected(reference, [image]))
        signalled: list[float] = []
        outcomes: list[tuple[float, float, str]] = []  # (start, end, outcome)
        stop = threading.Event()

        def hammer() -> None:
            # A fresh connection each time (no keep-alive race muddies "accepted"), from one client per thread:
            # a new httpx.Client per request spends more time building its SSL context than the server spends
            # on the request, and with four images each, most of a request's time is the server's, so
            # requests are inside the server, not still connecting, when SIGTERM comes.
            with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as http:
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        result = str(http.post("/embed", files=[("images", image)] * 4).status_code)
                    except httpx.ConnectError:
                        result = "refused"
                    except httpx.HTTPError as exc:
                        result = type(exc).__name__
                    outcomes.append((start, time.monotonic(), result))
                    if result != "200":
                        time.sleep(0.05)

        threads = [threading.Thread(target=hammer) for _ in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        signalled.append(time.monotonic())
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    sigterm = signalled[0]
    responses = [o for o in outcomes if o[2].isdigit()]
    log = [line[:300] for line in (tmp_path / "serve.log").read_text().splitlines()
           if "status=5" in line or "SIGTERM" in line or "failed" in line or "Error" in line]
    assert all(result == "200" for _, _, result in responses), (sorted({o[2] for o in responses}), log[:12])
    in_flight = [result for start, end, result in outcomes if start < sigterm < end]
    assert "200" in in_flight, f"requests in flight at SIGTERM: {in_flight}"
    assert all(start >= sigterm - 1 for start, _, result in outcomes if result != "200"), \
        "connections were refused only once the server was stopping"


def test_bentofile_builds_a_bento_with_the_service_and_the_model(model, tmp_path):
    _, model_dir = model
    context = tmp_path / "context"
    for name in ("serving", "pipeline"):
        shutil.copytree(PROJECT_ROOT / name, context / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "bentofile.yaml", context)
    shutil.copytree(model_dir.parent.parent, context / "models" / "current")  # the versioned MODEL_DIR
    (context / "models" / "current" / "versions" / ".build-killed").mkdir()  # a killed export's leftovers
    env = {**os.environ, **bentoml_env(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", ".", "--output", "tag"], cwd=context,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    bentos = list((tmp_path / "bentoml" / "bentos" / "barlow-embed").glob("*/bento.yaml"))
    assert len(bentos) == 1
    src = bentos[0].parent / "src"
    assert (src / "serving" / "service.py").is_file() and (src / "pipeline" / "data" / "preprocess.py").is_file()
    bundled = src / "models" / "current"
    assert sorted(p.name for p in bundled.iterdir()) == ["current.json", "versions"]
    assert [p.name for p in (bundled / "versions").iterdir()] == [model_dir.name]
    assert (resolve_model_dir(bundled) / "model.onnx").read_bytes() == (model_dir / "model.onnx").read_bytes()
    assert "serving.service:Embedder" in bentos[0].read_text()


# ---------------------------------------------------------------- BARLOW_ENCODER=process, BARLOW_DECODE=encoder (on the CPU)

MIN_COSINE = 0.999  # encoder-side decoding (torchvision + torch resize) against the PIL path


@pytest.fixture(scope="module")
def encoder_decoding_server(model, tmp_path_factory):
    """The GPU configuration, on CPU tensors: the encoder in its own process, fed by one HTTP worker,
    decodes the JPEGs."""
    tmp = tmp_path_factory.mktemp("encoder-decode")
    yield from served(model[1], tmp, BARLOW_ENCODER="process", BARLOW_DECODE="encoder", BARLOW_WORKERS="1",
                      BARLOW_MAX_IMAGES=str(MAX_IMAGES), BARLOW_ACCESS_LOG="1", BARLOW_MAX_PIXELS=str(MAX_PIXELS),
                      BARLOW_MAX_BATCH="32")


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def rotated_jpeg(seed: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(seed, size=(120, 70)), "JPEG", exif=exif, quality=92)


def test_encoder_decoding_matches_the_torch_encoder_with_a_png_in_the_same_request(encoder_decoding_server,
                                                                                     reference):
    images = [("a.jpg", encode(photo(300, size=(640, 480)), "JPEG", quality=90)),
              ("portrait.jpg", encode(photo(301, size=(90, 160)), "JPEG")),
              ("rotated6.jpg", rotated_jpeg(302, 6)), ("rotated3.jpg", rotated_jpeg(303, 3)),
              ("grey.jpg", encode(photo(304, mode="L"), "JPEG")),
              ("b.png", encode(photo(305), "PNG")), ("cmyk.jpg", encode(photo(306, mode="CMYK"), "JPEG"))]
    with httpx.Client(base_url=encoder_decoding_server.url, timeout=60) as http:
        before = metric_values(http)
        response = embed(http, images, normalize="false")
        assert response.status_code == 200, response.text
        got = np.array(response.json()["embeddings"], dtype=np.float32)
        wanted = expected(reference, images)
        assert got.shape == wanted.shape and cosines(got, wanted).min() >= MIN_COSINE, cosines(got, wanted)
        # PNG and CMYK were decoded by PIL in the worker: those rows are the PIL path's, to the export tolerance
        assert_close(got[5:], wanted[5:])
        sixth = embed(http, [images[2]], normalize="false").json()["embeddings"]
        assert cosines(sixth, wanted[2:3])[0] >= MIN_COSINE  # upright, alone as in a batch
        as_base64 = http.post("/embed_base64", json={"images": [base64.b64encode(b).decode() for _, b in images[:2]],
                                                     "normalize": False})
        assert as_base64.status_code == 200 and cosines(as_base64.json()["embeddings"], wanted[:2]).min() >= MIN_COSINE
        after = metric_values(http)

    def delta(metric: str, **labels) -> float:
        def total(values):
            return sum(v for (n, l), v in values.items() if n == metric and labels.items() <= dict(l).items())
        return total(after) - total(before)

    # three requests, each one call to the encoder's decoding API (the adaptive batcher counts calls) ...
    assert delta("bentoml_service_adaptive_batch_size_sum", method_name="encode_items") == 3
    assert delta("bentoml_service_adaptive_batch_size_sum", method_name="encode") == 0
    assert delta("barlow_batch_size_sum") == len(images) + 1 + 2  # ... carrying every image
    assert delta("barlow_encoder_decode_seconds_count") == 3  # decoded there, once per batch


def test_encoder_decoding_a_corrupt_jpeg_fails_only_its_own_request(encoder_decoding_server, reference):
    """Truncated JPEGs are refused in the worker (no end marker); a JPEG with a bogus Huffman table passes
    the header check and fails in the encoder's decode, in a batch shared with good requests."""
    good = [(f"{i}.jpg", encode(photo(400 + i, size=(200, 150)), "JPEG", quality=90)) for i in range(8)]
    wanted = expected(reference, good)
    huffman = bytearray(JPEG)
    table = JPEG.find(b"\xff\xc4")
    huffman[table + 5 : table + 21] = b"\xff" * 16
    bad = [("truncated.jpg", JPEG[: len(JPEG) // 2]), ("huffman.jpg", bytes(huffman))]
    payloads = [[good[i // 2]] if i % 2 == 0 else [GOOD, bad[(i // 2) % 2]] for i in range(16)]
    responses = embed_at_once(encoder_decoding_server.url, payloads)
    for i, response in enumerate(responses):
        if i % 2:
            assert response.status_code == 400, response.text
            body = response.json()
            assert body["index"] == 1 and "image 1" in body["error"], body
        else:
            assert response.status_code == 200, response.text
            assert cosines(response.json()["embeddings"], wanted[i // 2 : i // 2 + 1])[0] >= MIN_COSINE
    with httpx.Client(base_url=encoder_decoding_server.url, timeout=60) as http:
        assert http.get("/readyz").status_code == 200
        assert embed(http, [("x.jpg", bytes(huffman))]).json()["error"].startswith("image 0: the JPEG image is corrupt")
        too_big = embed(http, [("big.png", big_png(2000, 1000))])
        assert too_big.status_code == 413 and too_big.json()["index"] == 0  # refused by the header check


def test_the_access_log_is_off_unless_asked_for(server, client, encoder_decoding_server):
    """BentoML's line per request costs CPU the model needs at hundreds of requests/s: off by default,
    BARLOW_ACCESS_LOG=1 turns it on (the encoder-decoding server runs with it)."""
    images = [("a.jpg", encode(photo(7), "JPEG"))]
    assert embed(client, images).status_code == 200
    with httpx.Client(base_url=encoder_decoding_server.url, timeout=60) as http:
        assert embed(http, images).status_code == 200
    access_line = re.compile(r"method=POST,path=/embed\b.*status=200")

    def logged(running) -> bool:
        deadline = time.monotonic() + 10  # the worker's log reaches the file a moment after the response
        while not (found := bool(access_line.search(running.log_path.read_text()))) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    assert logged(encoder_decoding_server), log_tail(encoder_decoding_server)
    assert not access_line.search(server.log_path.read_text()), log_tail(server)


def test_one_worker_merges_concurrent_requests_into_fewer_encoder_calls(encoder_decoding_server):
    images = [(f"{i}.jpg", encode(photo(500 + i), "JPEG")) for i in range(24)]
    barrier = threading.Barrier(len(images))

    def send(i: int) -> int:
        with httpx.Client(base_url=encoder_decoding_server.url, timeout=60) as http:
            barrier.wait()
            return embed(http, [images[i]]).status_code

    with httpx.Client(base_url=encoder_decoding_server.url, timeout=60) as http:
        before = metric_values(http)
        with ThreadPoolExecutor(len(images)) as pool:
            assert list(pool.map(send, range(len(images)))) == [200] * len(images)
        after = metric_values(http)

    def calls(values) -> float:  # HTTP calls the encoder process received on its decoding API
        return sum(v for (n, l), v in values.items() if n == "bentoml_service_request_total"
                   and dict(l).get("endpoint") == "/encode_items")

    received = calls(after) - calls(before)
    assert 0 < received < len(images), f"{received} encoder calls for {len(images)} concurrent requests"
