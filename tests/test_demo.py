"""`barlow demo`, the README's first command, end to end at a tiny size: every stage runs for real, then
it serves until a signal stops it and its server with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from pipeline.serve import free_port

pytestmark = pytest.mark.slow  # shards all of Fashion-MNIST, exports, embeds 10,000 images, serves (~2 min)


def test_demo_runs_every_stage_serves_and_stops_its_server_on_sigterm(tmp_path, fashion_mnist):
    out, port = tmp_path / "demo", free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo", "--out", str(out), "--steps", "2",
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("search page: "):
                break
        assert lines and lines[-1].endswith("serving until Ctrl-C)"), "\n".join(lines[-30:])
        page = lines[-1].split()[2]
        assert page == f"http://127.0.0.1:{port}/" and 'id="file"' in httpx.get(page, timeout=10).text
        process.send_signal(signal.SIGTERM)  # what `docker stop` or a closed terminal's SIGHUP-then-TERM sends
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(httpx.ConnectError):  # the server went with it
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)

    assert any(line.startswith("MODEL_DIR ") and "parity max abs diff" in line for line in lines), lines
    quality = next(line for line in lines if line.startswith("quality: kNN top-1 on 2000 test images"))
    assert "raw pixels" in quality and "random init" in quality
    assert "below raw pixels: this run was too short" in quality  # 2 steps cannot beat them, and it says so
    search = next(line for line in lines if line.startswith("search: "))
    assert "top-1" in search and "neighbours are" in search
    embedded = next(line for line in lines if line.startswith("POST ") and "/embed -> model" in line)
    assert "dim 512" in embedded
    assert any("curl -F images=@" in line and "/search" in line for line in lines)
    assert (out / "run" / "encoder.pt").is_file() and (out / "model" / "current.json").is_file()
    manifest = json.loads((out / "search" / "embeddings" / "manifest.json").read_text())
    index = json.loads((out / "search" / "index" / "index.json").read_text())
    assert manifest["count"] == index["count"] == 10_000
