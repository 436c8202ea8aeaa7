"""Safe model rollout: versioned MODEL_DIRs, the current.json flip, pruning, and servers pinned to one version.

A MODEL_DIR written by `barlow export` is MODEL_DIR/versions/<version>/ plus current.json naming one of
them; `runtime.resolve_model_dir` is the one resolution every loader uses. The server test runs real
`bentoml serve` processes and a real export into the MODEL_DIR they serve.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest

from pipeline import export, storage
from pipeline.data.preprocess import load_array
from pipeline.errors import UserError
from pipeline.export import export_model, list_versions, prune_versions
from pipeline.runtime import (FP16_FILE, POINTER, POINTER_FORMAT, OnnxModel, load_model_info, resolve_model_dir,
                              sha256_file)
from pipeline.serve import PROJECT_ROOT, Server, free_port, serve_command, server_env, start_server, wait_ready

from helpers_serving import encode, log_tail, make_run_dir, photo, torch_embed, torch_reference

pytestmark = pytest.mark.slow  # each export traces and converts a ResNet-18 (~5-10 s on 2 cores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two RUN_DIRs with different weights (A, B) and a MODEL_DIR holding A."""
    base = tmp_path_factory.mktemp("rollout")
    run_a, run_b = make_run_dir(base / "run-a", seed=0), make_run_dir(base / "run-b", seed=1)
    model_dir = base / "model"
    info_a = export_model(run_a, model_dir)
    return run_a, run_b, model_dir, info_a


def pointer_of(model_dir) -> dict:
    return json.loads((model_dir / POINTER).read_text())


def test_export_writes_a_version_folder_then_points_at_it(runs):
    run_a, _, model_dir, info = runs
    assert sorted(p.name for p in model_dir.iterdir()) == [POINTER, "versions"]
    version = model_dir / "versions" / info["version"]
    assert sorted(p.name for p in version.iterdir()) == ["model.json", "model.onnx"]
    pointer = pointer_of(model_dir)
    assert pointer["format"] == POINTER_FORMAT and pointer["version"] == info["version"]
    assert pointer["onnx_sha256"] == info["onnx_sha256"] == sha256_file(version / "model.onnx")
    assert info["version"].endswith("-" + info["onnx_sha256"][:12]) and pointer["previous"] is None
    assert resolve_model_dir(model_dir) == version.resolve()
    assert resolve_model_dir(version) == version.resolve()  # a resolved folder resolves to itself
    assert load_model_info(resolve_model_dir(model_dir)) == info
    with pytest.raises(UserError, match="is a versioned MODEL_DIR"):
        load_model_info(model_dir)  # the unresolved folder is never read as a model


def test_failed_exports_leave_the_pointer_on_the_old_version(runs, monkeypatch):
    _, run_b, model_dir, info_a = runs
    before, versions = (model_dir / POINTER).read_bytes(), list_versions(model_dir)
    with pytest.raises(UserError, match="the export was not written"):
        export_model(run_b, model_dir, tolerance=0.0)  # fp32 parity fails after model.onnx was written
    monkeypatch.setattr(export, "FP16_MIN_COSINE", 1.5)  # no cosine reaches it: the fp16 gate must fail
    with pytest.raises(UserError, match=r"fp16 graph's embeddings reach cosine .* below 1.5"):
        export_model(run_b, model_dir, precision="both")
    assert (model_dir / POINTER).read_bytes() == before and list_versions(model_dir) == versions
    assert [p.name for p in (model_dir / "versions").iterdir()] == [info_a["version"]]  # no build folder left
    assert resolve_model_dir(model_dir).name == info_a["version"]


def test_a_damaged_pointer_is_one_sentence(tmp_path):
    (tmp_path / POINTER).write_text('{"format": "barlow-embed/model-pointer/1", "version": "../../etc"}')
    with pytest.raises(UserError, match="is not a barlow-embed/model-pointer/1 pointer"):
        resolve_model_dir(tmp_path)
    (tmp_path / POINTER).write_text(json.dumps({"format": POINTER_FORMAT, "version": "20260101T000000Z-gone"}))
    with pytest.raises(UserError, match=r"versions/20260101T000000Z-gone \(named by .*current.json\) has no model.onnx"):
        resolve_model_dir(tmp_path)


def _fake_versions(root, names):
    for name in names:
        folder = root / "versions" / name
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(name.encode())


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_pruning_keeps_the_newest_and_the_live_versions(where, tmp_path, request):
    names = [f"2026010{i}T000000.000Z-{i:012d}" for i in range(1, 6)]
    _fake_versions(tmp_path, names)
    location = tmp_path
    if where == "bucket":
        s3 = request.getfixturevalue("s3")
        s3.client().create_bucket(Bucket="models")
        storage.publish_folder(tmp_path, "s3://models/m")
        location = "s3://models/m"
    # Rolled back to the oldest, then a new export (the newest): the one named before must survive.
    pointer = {"format": POINTER_FORMAT, "version": names[4], "previous": names[0]}
    assert prune_versions(location, keep=2, pointer=pointer) == names[1:3]
    assert list_versions(location) == [names[0], names[3], names[4]]
    assert prune_versions(location, keep=1, pointer={**pointer, "previous": names[3]}) == [names[0]]
    assert list_versions(location) == names[3:]


def test_a_legacy_flat_model_dir_still_loads_and_serves(runs, tmp_path):
    _, _, model_dir, info = runs
    flat = tmp_path / "flat"
    shutil.copytree(resolve_model_dir(model_dir), flat)  # model.onnx + model.json at the top, no current.json
    assert resolve_model_dir(flat) == flat.resolve()
    model = OnnxModel(resolve_model_dir(flat), "cpu")
    assert model.runtime()["sha256"] == info["onnx_sha256"] and model.runtime()["file"] == "model.onnx"
    assert server_env(flat)["BARLOW_MODEL_DIR"] == str(flat.resolve())
    assert server_env(model_dir)["BARLOW_MODEL_DIR"] == str(model_dir / "versions" / info["version"])


def test_a_file_that_is_not_the_one_model_json_describes_is_refused(runs, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(resolve_model_dir(runs[2]), flat)
    onnx = flat / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # as if model.onnx were being replaced under a reader
    with pytest.raises(UserError, match=r"is not the file its model.json describes"):
        OnnxModel(flat, "cpu")


def test_a_bucket_model_dir_gets_current_json_last_and_readers_copy_only_that_version(runs, s3, tmp_path,
                                                                                     monkeypatch):
    run_a, _, _, _ = runs
    s3.client().create_bucket(Bucket="models")
    uploads = []
    real_upload = storage.upload

    def recording_upload(local, location):
        uploads.append(str(location))
        real_upload(local, location)

    monkeypatch.setattr(storage, "upload", recording_upload)
    old = "20000101T000000.000Z-000000000000"
    s3.client().put_object(Bucket="models", Key=f"m/versions/{old}/model.onnx", Body=b"old")
    info = export_model(run_a, "s3://models/m")
    version = f"s3://models/m/versions/{info['version']}"
    assert uploads[-1] == f"s3://models/m/{POINTER}"  # the flip is the last object written
    assert uploads[:-1] == [f"{version}/model.onnx", f"{version}/model.json"]  # model.json last in its folder
    assert json.loads(storage.read_text(f"s3://models/m/{POINTER}"))["version"] == info["version"]

    monkeypatch.setenv("BARLOW_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model_dir("s3://models/m")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx"]  # just that version
    assert OnnxModel(folder, "cpu").runtime()["sha256"] == info["onnx_sha256"]
    from serving.settings import settings_from_env

    monkeypatch.setenv("BARLOW_MODEL_DIR", "s3://models/m")
    assert settings_from_env().served_model_dir() == folder
    assert os.environ["BARLOW_MODEL_DIR"] == str(folder)  # pinned for the processes started after this one


def _embed(url: str, blobs: list[bytes]) -> np.ndarray:
    response = httpx.post(f"{url}/embed", files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)],
                          data={"normalize": "false"}, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"], dtype=np.float32)


def _close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return float(np.abs(actual - expected).max()) <= 1e-4 * float(np.abs(expected).max())


def _encoder_process(server: Server):
    import psutil

    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "barlow-batched-model" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_pointer_flip_never_changes_a_running_server(tmp_path):
    """A server started on A keeps serving A (its encoder restarted after a crash included) while an export
    flips the pointer to B; a server started afterwards serves B."""
    run_a, run_b = make_run_dir(tmp_path / "run-a", seed=0), make_run_dir(tmp_path / "run-b", seed=1)
    model_dir = tmp_path / "model"
    info_a = export_model(run_a, model_dir)
    blobs = [encode(photo(seed), "PNG") for seed in (1, 2, 3)]
    arrays = np.stack([load_array(b, 32) for b in blobs])
    want_a, want_b = torch_embed(torch_reference(run_a), arrays), torch_embed(torch_reference(run_b), arrays)
    assert not _close(want_a, want_b)

    # A plain `bentoml serve` given the MODEL_DIR itself: serving/settings.py resolves and pins the version.
    env = {**os.environ, "BARLOW_MODEL_DIR": str(model_dir), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true", "BARLOW_WORKERS": "1", "BARLOW_ENCODER": "process"}
    port = free_port()
    log = open(tmp_path / "a.log", "ab")
    process = subprocess.Popen(serve_command("127.0.0.1", port), env=env, cwd=PROJECT_ROOT, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    first = Server(process, f"http://127.0.0.1:{port}", tmp_path / "a.log")
    second = None
    try:
        wait_ready(first.url, process, 180)
        assert _close(_embed(first.url, blobs), want_a)

        info_b = export_model(run_b, model_dir)  # the flip, under the live server
        assert pointer_of(model_dir)["version"] == info_b["version"] != info_a["version"]
        assert pointer_of(model_dir)["previous"] == info_a["version"]

        body = httpx.get(f"{first.url}/model", timeout=30).json()
        assert body["version"] == info_a["version"] and body["onnx_sha256"] == info_a["onnx_sha256"]
        assert body["runtime"]["sha256"] == info_a["onnx_sha256"] and body["runtime"]["version"] == info_a["version"]
        assert _close(_embed(first.url, blobs), want_a), "the live server changed model after the flip"

        victim = _encoder_process(first)
        assert victim is not None, log_tail(first)
        victim.send_signal(signal.SIGKILL)  # the restarted encoder must load A again, not the new pointer
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            replacement = _encoder_process(first)
            if replacement is not None and replacement.pid != victim.pid:
                try:
                    if httpx.get(f"{first.url}/readyz", timeout=5).status_code == 200:
                        embeddings = _embed(first.url, blobs)
                        break
                except (httpx.HTTPError, AssertionError):
                    pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"the encoder was not restarted within 120 s: {log_tail(first)}")
        assert _close(embeddings, want_a), "the restarted encoder loaded the flipped pointer"

        second = start_server(model_dir, env={"BENTOML_HOME": str(tmp_path / "bentoml2"), "BARLOW_WORKERS": "1"},
                              log_file=tmp_path / "b.log")
        body = httpx.get(f"{second.url}/model", timeout=30).json()
        assert body["version"] == info_b["version"] and body["runtime"]["sha256"] == info_b["onnx_sha256"]
        assert _close(_embed(second.url, blobs), want_b)
    finally:
        if second is not None:
            assert second.stop() == 0, log_tail(second)
        assert first.stop() == 0, log_tail(first)
        log.close()


def test_fp16_export_keeps_the_io_types_and_records_its_parity(runs, tmp_path):
    import onnxruntime as ort

    run_a, _, _, _ = runs
    info = export_model(run_a, tmp_path / "m", precision="both")
    folder = resolve_model_dir(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == [FP16_FILE, "model.json", "model.onnx"]
    fp16 = info["fp16"]
    assert fp16["sha256"] == sha256_file(folder / FP16_FILE) == pointer_of(tmp_path / "m")["fp16_sha256"]
    parity = fp16["parity"]
    assert parity["images"] == 8 and len(parity["cosines"]) == 8 and parity["threshold"] == 0.999
    assert parity["min_cosine"] >= 0.999 and parity["max_rel"] > 1e-5  # fp16 rounding is there, and small
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() and \
        __import__("torch").cuda.is_available() else "onnx.reference"
    assert parity["evaluator"].startswith(expected)
    session = ort.InferenceSession(str(folder / FP16_FILE), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.type, out.type) == ("tensor(uint8)", "tensor(float)")
    import onnx

    graph = onnx.load(str(folder / FP16_FILE)).graph
    assert {i.data_type for i in graph.initializer if i.dims and len(i.dims) == 4} == {onnx.TensorProto.FLOAT16}

    # CPU: auto keeps fp32; fp16 asked for by name is refused in one sentence.
    model = OnnxModel(folder, "cpu")
    assert (model.runtime()["precision"], model.runtime()["file"]) == ("fp32", "model.onnx")
    with pytest.raises(UserError, match="fp16 was asked for but the device is cpu"):
        OnnxModel(folder, "cpu", precision="fp16")
    with pytest.raises(UserError, match=f"has no {FP16_FILE}"):
        OnnxModel(resolve_model_dir(runs[2]), "cpu", precision="fp16")


def test_the_fp16_gate_rejects_a_graph_that_is_not_the_model(runs, tmp_path):
    run_a, run_b, model_dir, _ = runs
    fp16 = tmp_path / FP16_FILE
    export.convert_fp16(resolve_model_dir(model_dir) / "model.onnx", fp16)
    assert export.check_fp16_parity(torch_reference(run_a), fp16, 32)["min_cosine"] >= 0.999
    with pytest.raises(UserError, match="below 0.999; the export was not written"):
        export.check_fp16_parity(torch_reference(run_b), fp16, 32)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_runs_on_the_gpu_when_auto(runs, tmp_path):
    run_a, _, _, _ = runs
    info = export_model(run_a, tmp_path / "m", precision="both")
    assert info["fp16"]["parity"]["evaluator"] == "CUDAExecutionProvider"
    model = OnnxModel(resolve_model_dir(tmp_path / "m"), "cuda")
    runtime = model.runtime()
    assert (runtime["precision"], runtime["file"], runtime["sha256"]) == ("fp16", FP16_FILE, info["fp16"]["sha256"])
    arrays = np.stack([load_array(encode(photo(s), "PNG"), 32) for s in range(4)])
    actual, expected = model(arrays), torch_embed(torch_reference(run_a), arrays)
    cosine = (actual * expected).sum(1) / np.linalg.norm(actual, axis=1) / np.linalg.norm(expected, axis=1)
    assert actual.dtype == np.float32 and cosine.min() >= 0.999
    assert OnnxModel(resolve_model_dir(tmp_path / "m"), "cuda", precision="fp32").runtime()["precision"] == "fp32"
