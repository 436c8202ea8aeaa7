"""Fuzz /embed of a real `bentoml serve` with mutated JPEG/PNG/GIF/WebP/TIFF bytes (hypothesis).

Every request gets a 200 or a 4xx with a JSON `error` sentence, never a 5xx, and the server stays
ready. CI tries FUZZ_CASES examples (derandomized, so a failure replays); bench/fuzz.py runs
thousands with the same strategies against the same kind of server and records the counts.
"""

from __future__ import annotations

import os
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.export import export_model

from helpers_fuzz import check_response, hostile_image, seed_images
from helpers_serving import log_tail, make_run_dir, served

pytestmark = pytest.mark.slow

FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "60"))
SEEDS = seed_images()
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    export_model(make_run_dir(base / "run-fuzz"), base / "model")
    yield from served(base / "model", base)  # default limits


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_seed_images_are_embedded(http):
    response = http.post("/embed", files=[("images", (f"seed.{fmt.lower()}", blob)) for fmt, blob in SEEDS.items()])
    assert check_response(response, len(SEEDS)) == "ok", response.text


@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(hostile=hostile_image(), valid_too=st.booleans())
def test_hostile_images_get_200_or_a_json_4xx_and_the_server_stays_ready(http, server, hostile, valid_too):
    fmt, blob = hostile
    files = [("images", (f"hostile.{fmt.lower()}", blob, "application/octet-stream"))]
    if valid_too:  # a bad image fails its own request only, whatever its position
        files.append(("images", ("seed.png", SEEDS["PNG"], "image/png")))
    OUTCOMES[check_response(http.post("/embed", files=files), len(files))] += 1
    assert server.process.poll() is None, log_tail(server)


def test_server_ready_after_fuzzing(http, server):
    assert http.get("/readyz").status_code == 200
    assert server.process.poll() is None
    assert sum(OUTCOMES.values()) >= FUZZ_CASES and len(OUTCOMES) >= 2, OUTCOMES  # both accepted and rejected
