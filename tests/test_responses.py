"""serving/responses.py: content negotiation and the JSON, base64 and .npy encodings, without a server.
The same functions behind a real `bentoml serve`: tests/test_service.py (slow)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from serving.requests import RequestError
from serving.responses import (JSON, NPY, ResponseFormat, decode_base64_body, header_value, json_base64, json_floats,
                               negotiate, npy, render)

EMBEDDINGS = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)


@pytest.mark.parametrize("accept", ["", "*/*", "application/json", "application/*", "application/json; charset=utf-8",
                                    "text/html, */*;q=0.8", "application/x-npy;q=0.5, application/json",
                                    "application/x-npy, application/json", "image/png, application/json;q=0.1"])
def test_json_is_the_default_and_what_wildcards_and_ties_get(accept):
    assert negotiate(accept, {}) == ResponseFormat(JSON, "floats", "float32")


@pytest.mark.parametrize("accept", ["application/x-npy", "application/x-npy, */*;q=0.9", "application/x-npy, */*",
                                    "application/json;q=0.2, application/x-npy;q=0.9", "application/json;q=0, */*",
                                    "Application/X-NPY"])
def test_npy_when_asked_for_above_json(accept):
    assert negotiate(accept, {}).media_type == NPY


def test_query_parameters_choose_base64_and_float16():
    assert negotiate("", {"encoding": "base64"}) == ResponseFormat(JSON, "base64", "float32")
    assert negotiate("*/*", {"encoding": "BASE64", "dtype": "float16"}) == ResponseFormat(JSON, "base64", "float16")
    assert negotiate(NPY, {"dtype": "float16"}) == ResponseFormat(NPY, "floats", "float16")
    assert negotiate(NPY, {"dtype": "float16"}).binary and not negotiate("", {}).binary


@pytest.mark.parametrize("accept, hint", [("text/html", ""), ("image/png, text/*", ""),
                                          ("application/json;q=0, application/x-npy;q=0", ""),
                                          ("application/x-npy; dtype=float16", "?dtype=float16"),
                                          ("application/json; charset=latin-1", "")])
def test_nothing_acceptable_is_406_with_a_json_reason(accept, hint):
    with pytest.raises(RequestError) as caught:
        negotiate(accept, {})
    error = caught.value
    assert error.status == 406 and error.reason == "not_acceptable"
    assert JSON in error.message and NPY in error.message and hint in error.message
    body = json.loads(error.response().body)
    assert body == {"error": error.message, "reason": error.reason, "index": None}


@pytest.mark.parametrize("accept, query, status, words", [
    ("", {"encoding": "hex"}, 422, "encoding must be one of floats, base64"),
    ("", {"dtype": "float64"}, 422, "dtype must be one of float32, float16"),
    ("", {"dtype": "float16"}, 422, "JSON floats are float32"),
    (NPY, {"encoding": "base64"}, 422, "applies to JSON responses"),
    ("application/json;q=high", {}, 400, "q is 0 to 1"),
    ("application/json;q=2", {}, 400, "q is 0 to 1"),
    ("json", {}, 400, "not a media type"),
])
def test_bad_options_and_a_malformed_accept_are_4xx(accept, query, status, words):
    with pytest.raises(RequestError, match=words) as caught:
        negotiate(accept, query)
    assert caught.value.status == status


def test_json_floats_read_back_as_the_same_float32_in_fewer_bytes():
    body = json_floats("mödel", 5, EMBEDDINGS)
    parsed = json.loads(body)
    assert set(parsed) == {"model", "dim", "embeddings"} and parsed["model"] == "mödel" and parsed["dim"] == 5
    assert np.array_equal(np.array(parsed["embeddings"], dtype=np.float32), EMBEDDINGS)
    widened = json.dumps({"model": "mödel", "dim": 5, "embeddings": EMBEDDINGS.tolist()}, ensure_ascii=False)
    assert len(body) < len(widened.encode())  # shortest float32 decimals, not float64 widenings
    assert json.loads(json_floats("m", 5, EMBEDDINGS[:0]))["embeddings"] == []
    with pytest.raises(ValueError, match="not finite"):
        json_floats("m", 5, np.array([[np.nan, 0, 0, 0, 0]], dtype=np.float32))


def test_npy_round_trips_float32_exactly_and_float16_within_1e_3():
    exact = np.load(io.BytesIO(npy(EMBEDDINGS)), allow_pickle=False)
    assert exact.dtype == np.dtype("<f4") and exact.shape == (3, 5) and np.array_equal(exact, EMBEDDINGS)
    unit = EMBEDDINGS / np.linalg.norm(EMBEDDINGS, axis=1, keepdims=True)
    half = np.load(io.BytesIO(npy(unit, "float16")), allow_pickle=False)
    assert half.dtype == np.dtype("<f2") and np.abs(half.astype(np.float32) - unit).max() <= 1e-3
    assert npy(EMBEDDINGS).startswith(b"\x93NUMPY")


def test_base64_json_carries_the_little_endian_bytes_with_dtype_and_shape():
    body = json.loads(json_base64("m", 5, EMBEDDINGS))
    assert set(body) == {"model", "dim", "dtype", "shape", "embeddings_base64"}
    assert body["model"] == "m" and body["dim"] == 5 and body["dtype"] == "float32" and body["shape"] == [3, 5]
    raw = base64.b64decode(body["embeddings_base64"])
    assert raw == EMBEDDINGS.astype("<f4").tobytes() and len(raw) == 3 * 5 * 4
    assert np.array_equal(decode_base64_body(body), EMBEDDINGS)
    half = json.loads(json_base64("m", 5, EMBEDDINGS, "float16"))
    assert half["dtype"] == "float16" and len(base64.b64decode(half["embeddings_base64"])) == 3 * 5 * 2
    assert np.allclose(decode_base64_body(half), EMBEDDINGS, atol=3e-3)


def test_float16_overflow_is_a_422_not_an_inf():
    with pytest.raises(RequestError, match="float16's range") as caught:
        npy(np.array([[1.0, 70000.0]], dtype=np.float32), "float16")
    assert caught.value.status == 422
    assert np.isinf(np.load(io.BytesIO(npy(np.array([[np.inf]], dtype=np.float32), "float16")))).all()


def test_render_sets_the_media_type_and_the_model_headers():
    for fmt, media_type in ((ResponseFormat(), JSON), (ResponseFormat(JSON, "base64"), JSON),
                            (ResponseFormat(NPY), NPY)):
        body, media, headers = render(fmt, "run-x-resnet18", 5, EMBEDDINGS)
        assert media == media_type and body
        assert headers == {"X-Barlow-Model": "run-x-resnet18", "X-Barlow-Dim": "5", "Vary": "Accept"}
    assert render(ResponseFormat(NPY), "m", 5, EMBEDDINGS)[0] == npy(EMBEDDINGS)


def test_header_values_stay_printable_ascii():
    assert header_value("run-x resnet18") == "run-x resnet18"
    assert header_value("modèle\n") == "mod%C3%A8le%0A"
