"""barlow export: one-file ONNX with normalisation inside, model.json, and the parity gate (test_rollout.py:
versions, the pointer, pruning and fp16)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.data.preprocess import load_array
from pipeline.errors import UserError
from pipeline.export import check_parity, export_model
from pipeline.runtime import POINTER, resolve_model_dir

from helpers_serving import make_run_dir, sample_images, torch_reference

pytestmark = pytest.mark.slow  # each export traces and converts a ResNet-18 (~5 s on 2 cores)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    run_dir = make_run_dir(base / "run-export")
    info = export_model(run_dir, base / "model")
    return run_dir, resolve_model_dir(base / "model"), info  # the version folder current.json names


def test_model_dir_holds_one_onnx_file_and_model_json(exported):
    run_dir, model_dir, info = exported
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.onnx"]  # weights inside, no .data
    assert model_dir.name == info["version"] and model_dir.parent.name == "versions"
    on_disk = json.loads((model_dir / "model.json").read_text())
    assert on_disk == info
    assert info["name"] == "run-export-resnet18" and info["dim"] == 512 and info["image_size"] == 32
    assert info["input"]["shape"] == ["batch", 3, 32, 32] and info["input"]["dtype"] == "uint8"
    assert info["mean"] == [0.286] * 3 and info["std"] == [0.353] * 3
    assert info["source"]["sha256"] == hashlib.sha256((run_dir / "encoder.pt").read_bytes()).hexdigest()
    assert info["onnx_sha256"] == hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()
    assert info["config"]["model"]["arch"] == "resnet18" and info["config"]["views"]["image_size"] == 32
    assert {"torch", "onnx", "onnxruntime-gpu", "python"} <= set(info["versions"])
    assert info["precisions"] == ["fp32"] and info["fp16"] is None
    parity = info["parity"]
    assert {(c["images"], c["batch"]) for c in parity["checks"]} == {(k, b) for k in ("random", "real") for b in (1, 8)}
    assert 0 < parity["max_abs"] and parity["max_rel"] <= parity["tolerance"] == 1e-4


def test_graph_takes_uint8_with_a_dynamic_batch_and_returns_backbone_features(exported):
    import onnxruntime as ort

    run_dir, model_dir, _ = exported
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [3, 32, 32])
    assert isinstance(inp.shape[0], str), "batch axis is dynamic"
    assert (out.name, out.type, out.shape[1]) == ("embedding", "tensor(float)", 512)
    images = np.stack([load_array(data, 32) for _, data in sample_images()[:5]])  # batch 5: neither 1 nor 8
    onnx_out = session.run(["embedding"], {"images": images})[0]
    # The reference normalises by hand, independently of FeatureExtractor: normalisation must be in the graph.
    backbone = torch_reference(run_dir).backbone
    mean, std = torch.tensor([0.286] * 3).view(1, 3, 1, 1), torch.tensor([0.353] * 3).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = backbone((torch.from_numpy(images).float() / 255 - mean) / std).numpy()
    assert onnx_out.shape == (5, 512) and onnx_out.dtype == np.float32
    np.testing.assert_allclose(onnx_out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_parity_gate_fails_with_a_clear_message_and_writes_nothing(exported, tmp_path):
    run_dir, model_dir, _ = exported
    other_run = make_run_dir(tmp_path / "other", seed=1)  # a different encoder: the graph no longer matches
    with pytest.raises(UserError, match=r"differs from the torch FeatureExtractor by max abs .* above the tolerance"):
        check_parity(torch_reference(other_run), model_dir / "model.onnx", 32, 1e-4)
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.json").write_text('{"previous": true}')
    with pytest.raises(UserError, match="the export was not written"):
        export_model(run_dir, out, tolerance=0.0)  # ONNX Runtime is never bit-exact with torch here
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "versions"]
    assert list((out / "versions").iterdir()) == []  # the build folder is gone, nothing was published
    assert json.loads((out / "model.json").read_text()) == {"previous": True}


def test_cli_export_reports_parity_and_rejects_a_missing_run(exported, tmp_path, capsys):
    run_dir, _, _ = exported
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "m")]) == 0
    line = capsys.readouterr().out
    assert "parity vs torch" in line and "max abs" in line and f"pointed {tmp_path / 'm' / POINTER} at it" in line
    assert (resolve_model_dir(tmp_path / "m") / "model.onnx").is_file()
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--keep", "0"]) == 2
    assert "--keep must be at least 1" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "encoder.pt" in capsys.readouterr().err
