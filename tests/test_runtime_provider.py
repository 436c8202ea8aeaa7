"""No silent fallback: OnnxModel refuses a device asked for by name whose provider is not the one
running (pipeline/runtime.py), and a service process that cannot start stops the whole server
(serving/startup.py). Runs on the CPU: onnxruntime-gpu lists CUDA and TensorRT here but cannot load
them, which is exactly the failure to catch. The same in a real `bentoml serve`: tests/test_service.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import devices
from pipeline.errors import UserError
from pipeline.runtime import FP16_FILE, MODEL_FORMAT, OnnxModel, check_active, model_file, sha256_file, usable_cpus
from serving import startup

REPO = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the CUDA provider loads")


def tiny_model_dir(folder: Path, **info) -> Path:
    """A MODEL_DIR whose graph is uint8 [N, 3, 4, 4] -> float32 [N, 48] (a cast and a flatten): a real
    ONNX Runtime session in milliseconds, without torch export."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["floats"], to=TensorProto.FLOAT),
         helper.make_node("Flatten", ["floats"], ["embedding"], axis=1)], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 48])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    (folder / "model.json").write_text(json.dumps(
        {"format": MODEL_FORMAT, "name": "tiny", "dim": 48, "image_size": 4, **info}))
    return folder


@pytest.fixture()
def gpu_seen(monkeypatch):
    """torch 'sees' a GPU: the ORT-level check must still catch a CUDA provider that cannot load."""
    monkeypatch.setattr(devices, "gpu_available", lambda: True)


def test_cpu_runs_and_reports_what_runs(tmp_path):
    model = OnnxModel(tiny_model_dir(tmp_path / "m"), "cpu")
    images = np.arange(2 * 48, dtype=np.uint8).reshape(2, 3, 4, 4)
    assert np.array_equal(model(images), images.reshape(2, 48).astype(np.float32))
    assert model.runtime() == {"provider": "CPUExecutionProvider", "providers": ["CPUExecutionProvider"],
                               "device": "cpu", "requested_device": "cpu", "precision": "fp32", "threads": usable_cpus(),
                               "version": None,
                               "file": "model.onnx", "sha256": sha256_file(tmp_path / "m" / "model.onnx")}


def test_the_fp16_file_is_chosen_only_for_a_gpu_provider_that_onnxruntime_has(tmp_path):
    folder = tiny_model_dir(tmp_path / "m")
    info = json.loads((folder / "model.json").read_text())
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert model_file(folder, info, "auto", "cuda", both) == ("fp32", folder / "model.onnx")  # no fp16 file
    (folder / FP16_FILE).write_bytes((folder / "model.onnx").read_bytes())
    assert model_file(folder, info, "auto", "cuda", both) == ("fp16", folder / FP16_FILE)
    assert model_file(folder, info, "auto", "tensorrt", ["TensorrtExecutionProvider", *both])[0] == "fp16"
    assert model_file(folder, info, "auto", "cpu", both) == ("fp32", folder / "model.onnx")
    assert model_file(folder, info, "auto", "cuda", ["CPUExecutionProvider"])[0] == "fp32"  # CPU-only onnxruntime
    assert model_file(folder, info, "fp32", "cuda", both)[0] == "fp32"
    with pytest.raises(UserError, match="fp16 was asked for but the device is cuda without a GPU provider"):
        model_file(folder, info, "fp16", "cuda", ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="precision must be one of auto, fp32, fp16"):
        model_file(folder, info, "half", "cuda", both)


def test_precision_comes_from_model_json(tmp_path):
    assert OnnxModel(tiny_model_dir(tmp_path / "m", precision="fp16"), "cpu").runtime()["precision"] == "fp16"


@NO_GPU
@pytest.mark.parametrize("device, provider", [("cuda", "CUDAExecutionProvider"),
                                              ("tensorrt", "TensorrtExecutionProvider")])
def test_a_named_device_whose_provider_cannot_load_is_refused(tmp_path, gpu_seen, device, provider):
    with pytest.raises(UserError) as caught:
        OnnxModel(tiny_model_dir(tmp_path / "m"), device)
    message = str(caught.value)
    assert message.startswith(f"{provider} was asked for but ONNX Runtime runs CPUExecutionProvider")
    assert "failed to load" in message and "CUDA" in message and "\n" not in message


@NO_GPU
def test_a_named_device_without_a_visible_gpu_is_refused_before_any_session(tmp_path):
    with pytest.raises(UserError, match="device cuda asked for, but torch sees no CUDA GPU"):
        OnnxModel(tiny_model_dir(tmp_path / "m"), "cuda")


@NO_GPU
def test_auto_logs_its_choice_and_a_provider_that_did_not_load(tmp_path, gpu_seen, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.runtime"):
        model = OnnxModel(tiny_model_dir(tmp_path / "m"), "auto")
    assert model.provider == "CPUExecutionProvider" and model.runtime()["requested_device"] == "auto"
    messages = [record.getMessage() for record in caplog.records]
    assert "device auto: cuda (torch sees a GPU)" in messages
    assert any(m.startswith("CUDAExecutionProvider is not running (ONNX Runtime runs CPUExecutionProvider)")
               for m in messages), messages


def test_auto_without_a_gpu_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(devices, "gpu_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="pipeline.runtime"):
        assert OnnxModel(tiny_model_dir(tmp_path / "m"), "auto").provider == "CPUExecutionProvider"
    assert "device auto: cpu (torch sees no GPU)" in [record.getMessage() for record in caplog.records]


def test_check_active_names_the_cause():
    check_active("CUDAExecutionProvider", "CUDAExecutionProvider", True, [])  # running: nothing to say
    with pytest.raises(UserError, match="this onnxruntime has no CUDAExecutionProvider .install onnxruntime-gpu"):
        check_active("CUDAExecutionProvider", "CPUExecutionProvider", True, ["CPUExecutionProvider"])
    check_active("CUDAExecutionProvider", "CPUExecutionProvider", False, ["CPUExecutionProvider"])  # auto: a warning


def test_stop_server_outside_a_supervised_server_only_logs(monkeypatch, caplog):
    monkeypatch.delenv(startup.SUPERVISOR_ENV, raising=False)
    with caplog.at_level(logging.ERROR, logger="serving.startup"):
        assert startup.stop_server("device cuda asked for") is False
    assert "cannot start: device cuda asked for" in caplog.text
    monkeypatch.setenv(startup.SUPERVISOR_ENV, str(os.getpid()))  # not our parent: never signalled
    assert startup.stop_server("again") is False


def test_the_signal_handler_stops_all_watchers_through_circus_loop(monkeypatch):
    """Inside `bentoml serve`, circus's SIGTERM handler leads to its loop and arbiter."""
    scheduled = []
    arbiter = SimpleNamespace(stop_watchers=object())
    controller = SimpleNamespace(arbiter=arbiter, loop=SimpleNamespace(add_callback_from_signal=scheduled.append))

    class SysHandler:  # circus.sighandler.SysHandler's shape
        def __init__(self):
            self.controller = controller

        def signal(self, signum, frame):
            raise AssertionError("not called")

    monkeypatch.setattr(startup.signal, "getsignal", lambda signum: SysHandler().signal)
    startup.stop_all_services(signal.SIGUSR1, None)
    assert scheduled == [arbiter.stop_watchers]


def test_a_child_of_the_hooked_process_stops_it(tmp_path):
    """The pid handshake end to end, without circus: the hooked process falls back to SIGTERM itself."""
    signalled = tmp_path / "signalled"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        from serving.startup import install_supervisor_hook
        install_supervisor_hook()
        subprocess.run([sys.executable, "-c", "import pathlib; from serving.startup import stop_server; "
                        "pathlib.Path({str(signalled)!r}).write_text(str(stop_server('cannot load')))"])
        time.sleep(30)
        print("not stopped", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr[-2000:]
    assert signalled.read_text() == "True" and "not stopped" not in result.stdout
    assert "cannot start: cannot load" in result.stderr and "stopping the server" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_cuda_is_what_runs(tmp_path):
    """The GPU twin of the refusal tests above: the same check passes when the provider loads."""
    model = OnnxModel(tiny_model_dir(tmp_path / "m"), "cuda")
    assert model.runtime()["provider"] == "CUDAExecutionProvider" and model.runtime()["device"] == "cuda"
    images = np.arange(48, dtype=np.uint8).reshape(1, 3, 4, 4)
    assert np.array_equal(model(images), images.reshape(1, 48).astype(np.float32))
