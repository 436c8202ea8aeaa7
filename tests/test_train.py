"""End-to-end training through the real CLI: tiny preset, resume after kill -9, SIGTERM, bad states."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.data.shards import write_shards
from pipeline.errors import UserError
from pipeline.train.checkpoint import TRAINING_FORMAT, load_encoder, safe_load

# Deterministic CPU kernels and a fixed thread count: the bit-exact resume test compares raw bytes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards("fashion-mnist:test", out, per_shard=48, limit=200)  # 5 shards, the last one short
    return out


def barlow(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(record["step"] >= step for record in read_metrics(run_dir)):
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
def test_tiny_preset_trains_end_to_end_and_loss_falls(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = barlow("train", "--preset", "tiny", "--data", str(tiny_shards), "--out", str(run_dir),
                    "--steps", "40", "optim.lr_weights=0.8", "optim.warmup_epochs=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[:5], records[-5:]
    assert sum(r["loss"] for r in last) < 0.8 * sum(r["loss"] for r in first), [r["loss"] for r in records]
    assert all(r["images_per_s"] > 0 and r["lr"] >= 0 for r in records)
    diag = [r for r in records if "rankme" in r]
    assert diag and all(1 <= r["rankme"] <= 64 and r["std"] > 0 for r in diag)
    for name in ("config.yaml", "checkpoints/last.pt", "encoder.pt", "plots/loss.png", "plots/crosscorr.png"):
        assert (run_dir / name).stat().st_size > 0, name
    backbone, config = load_encoder(run_dir / "encoder.pt")
    assert config.model.arch == "resnet18" and config.train.steps == 40
    features = backbone(torch.randn(3, 3, 16, 16))
    assert features.shape == (3, 512) and torch.isfinite(features).all()


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path, TRAINING_FORMAT)["model"]


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tiny_shards, tmp_path):
    common = ["--preset", "tiny", "--data", str(tiny_shards), "--steps", "14", "data.workers=2",
              "train.checkpoint_every=3", "train.deterministic=true"]
    reference = barlow("train", *common, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    for kill_at in (5, 10):  # two kills: mid-epoch and in the second epoch (12 steps per epoch)
        process = start("train", *common, "--out", str(interrupted))
        wait_for_step(interrupted, kill_at, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert safe_load(interrupted / "checkpoints" / "last.pt", TRAINING_FORMAT)["step"] < 14
    resumed = barlow("train", *common, "--out", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr

    expected, actual = model_state(tmp_path / "reference/checkpoints/last.pt"), model_state(interrupted / "checkpoints/last.pt")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"
    # metrics.jsonl has every step exactly once despite the steps redone after each kill
    assert [r["step"] for r in read_metrics(interrupted)] == list(range(1, 15))


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143_then_resumes(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(tiny_shards), "--out", str(run_dir), "--steps", "500",
            "train.checkpoint_every=1000"]
    process = start(*args)
    wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    state = safe_load(run_dir / "checkpoints" / "last.pt", TRAINING_FORMAT)
    assert state["step"] >= 3
    assert not (run_dir / "encoder.pt").exists()  # the run is not finished
    resumed = barlow("train", "--out", str(run_dir), "--steps", str(state["step"] + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert safe_load(run_dir / "checkpoints" / "last.pt", TRAINING_FORMAT)["step"] == state["step"] + 2


@pytest.mark.slow  # a real `barlow train` process (~7 s on 2 cores)
def test_non_finite_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = barlow("train", "--preset", "tiny", "--data", str(tiny_shards), "--out", str(run_dir), "--steps", "8",
                    "optim.lr_weights=1e38", "optim.warmup_epochs=0", "data.workers=0")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("barlow train: error:") and "non-finite at or before step" in message and "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # nothing good to keep yet: nothing written


@pytest.mark.slow  # a real `barlow train` process (~5 s on 2 cores)
def test_truncated_or_foreign_checkpoint_gives_one_sentence(tiny_shards, tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": TRAINING_FORMAT, "step": 1}, good)
    truncated = tmp_path / "run" / "checkpoints" / "last.pt"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(good.read_bytes()[:50])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        safe_load(truncated, TRAINING_FORMAT)
    foreign = tmp_path / "foreign.pt"
    torch.save([1, 2, 3], foreign)
    with pytest.raises(UserError, match="is not a barlow-embed/training/1 checkpoint"):
        safe_load(foreign, TRAINING_FORMAT)
    result = barlow("train", "--preset", "tiny", "--data", str(tiny_shards), "--out", str(tmp_path / "run"), "--steps", "2")
    assert result.returncode == 2
    assert "not a readable checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # five real `barlow train` processes (~35 s on 2 cores)
def test_cli_errors_are_one_sentence(tiny_shards, tmp_path):
    cases = [
        (["train", "--out", str(tmp_path / "x")], "give --preset"),
        (["train", "--preset", "tiny", "--out", str(tmp_path / "x")], "no training data"),
        (["train", "--preset", "tiny", "--data", str(tiny_shards), "optim.nope=1"], "unknown config key"),
        (["train", "--preset", "tiny", "--data", str(tiny_shards), "optim.batch_size=abc"], "must be an integer"),
        (["train", "--preset", "tiny", "--data", str(tmp_path / "missing.tar")], "missing.tar"),
    ]
    for args, expected in cases:
        result = barlow(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
