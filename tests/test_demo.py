"""`barlow demo`, the README's first command, end to end at a tiny size: every stage runs for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # shards all of Fashion-MNIST, exports, embeds 10,000 images, serves (~2 min)


def test_demo_runs_every_stage_and_answers_one_request(tmp_path, fashion_mnist):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--out", str(out), "--steps", "2",
                             "--no-serve", "--port", "0"], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("MODEL_DIR ") and "parity max abs diff" in line for line in lines), result.stdout
    search = next(line for line in lines if line.startswith("search: "))
    assert "top-1" in search and "neighbours are" in search
    embedded = next(line for line in lines if line.startswith("POST ") and "/embed -> model" in line)
    assert "dim 512" in embedded
    assert any("curl -F images=@" in line and "/search" in line for line in lines)
    assert (out / "run" / "encoder.pt").is_file() and (out / "model" / "model.onnx").is_file()
    manifest = json.loads((out / "search" / "embeddings" / "manifest.json").read_text())
    index = json.loads((out / "search" / "index" / "index.json").read_text())
    assert manifest["count"] == index["count"] == 10_000
