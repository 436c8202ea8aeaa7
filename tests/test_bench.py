"""The benchmark scripts run and write the record keys their committed records have (CPU, tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each script starts torch and times a few steps (~20-40 s on 2 cores)


def key_paths(record: object, prefix: str = "") -> set[str]:
    if not isinstance(record, dict):
        return set()
    return {path for key, value in record.items() for path in {prefix + key} | key_paths(value, f"{prefix}{key}.")}


@pytest.mark.parametrize("script, args, committed", [
    ("train_throughput.py", ["--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--images", "64", "--workers", "1"],
     "train_throughput-cpu-2core-2026-12-01.json"),
    ("augment_ops.py", ["--batch", "4"], "augment_ops-cpu-1threads-2026-12-01.json"),
    # a real server and bench/loadgen.py's clients, a second per round
    ("serve_throughput.py", ["--seconds", "1", "--rounds", "1", "--warmup", "0.5"],
     "serve-cpu-2core-resnet18-32px-2026-12-01.json"),
])
def test_bench_script_writes_the_committed_record_keys(tmp_path, script, args, committed):
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(tmp_path.glob(f"{committed.split('-')[0]}-*.json"))
    assert len(written) == 1, result.stdout[-2000:]
    expected = key_paths(json.loads((REPO / "bench" / "results" / committed).read_text()))
    record = json.loads(written[0].read_text())
    assert key_paths(record) == expected
    assert record.get("failures", {}) == {}, "every request the load generator sent was answered 200"
    if "cpu_ms" in record:  # the serve benchmark's accounting (it checked that every refused request got 406)
        cpu = record["cpu_ms"]
        assert 0 < cpu["server_per_request_refused"] < cpu["server_per_request"] and cpu["client_per_request"] > 0
        assert 0 < record["served_over_raw_ceiling"] < 1


def test_quality_writes_the_record_issue_14_names(tmp_path):
    """bench/quality.py end to end at tiny size: pretraining with the kNN monitor, export, eval with
    baselines; then the supervised ceiling added to that record. The record holds the curve and every
    baseline, the RUN_DIR plots/knn.png."""
    work, env = tmp_path / "work", {**os.environ, "PYTHONPATH": str(REPO)}
    script = str(REPO / "bench" / "quality.py")
    result = subprocess.run([sys.executable, script, "--preset", "tiny", "--steps", "6", "--monitor-minutes", "0.001",
                             "--limit-train", "300", "--limit-test", "100", "--no-supervised", "--work", str(work),
                             "--out", str(tmp_path), "train.log_every=2"],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("quality-*.json")
    record = json.loads(written.read_text())
    assert record["preset"] == "tiny" and record["steps"] == 6 and record["commit"]
    assert set(record["baselines"]) == {"raw_knn", "random_knn", "random_linear"}  # --no-supervised
    minutes = [m for m, _ in record["curve"]]
    assert len(minutes) >= 3 and minutes == sorted(minutes) and all(0 <= k <= 1 for _, k in record["curve"])
    assert 0 < record["curve_raw_knn"] < 1
    assert record["targets"] == {"met": False}  # tiny has no targets
    (run_dir,) = work.glob("run-*")
    assert (run_dir / "plots" / "knn.png").stat().st_size > 1000

    result = subprocess.run([sys.executable, script, "--supervised-for", str(written)], capture_output=True, text=True,
                            timeout=900, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(written.read_text())
    assert 0 < record["baselines"]["supervised_linear"] <= 1 and record["supervised"]["steps"] >= 1
    assert abs(record["supervised"]["train_minutes"] - record["train_minutes"]) < 0.2  # the same minutes
    assert record["knn"] and record["curve"]  # the rest of the record kept
