"""The benchmark scripts run and write the record keys their committed records have (CPU, tiny sizes)."""

from __future__ import annotations

import json
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
     "train_throughput-cpu-2core-2026-11-27.json"),
    ("augment_ops.py", ["--batch", "4"], "augment_ops-cpu-1threads-2026-11-27.json"),
])
def test_bench_script_writes_the_committed_record_keys(tmp_path, script, args, committed):
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(tmp_path.glob(f"{script.removesuffix('.py')}-*.json"))
    assert len(written) == 1, result.stdout[-2000:]
    expected = key_paths(json.loads((REPO / "bench" / "results" / committed).read_text()))
    assert key_paths(json.loads(written[0].read_text())) == expected
