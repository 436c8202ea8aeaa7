"""`barlow serve MODEL_DIR`: run `bentoml serve serving.service:Embedder` with the environment set.

The server is a child process (BentoML's process manager plus one process per service). SIGTERM
and SIGINT are forwarded to it, so in-flight requests drain before it exits, and `barlow serve`
then exits 0. `start_server` is the same launch for scripts, the demo and tests: it returns once
/readyz answers 200 (model loaded and one warm-up inference done).

MODEL_DIR is resolved once, here (`runtime.resolve_model_dir`: current.json -> versions/<version>/, or
a legacy flat folder), and the child gets that version folder as BARLOW_MODEL_DIR: every process of the
server, a restarted encoder included, loads the same version even when an export flips the pointer while
it runs. MODEL_DIR and INDEX_DIR may be bucket URLs (s3://, gs://, az://, http(s)): their files are
downloaded to a local cache first (`storage.local_copy`, just the resolved version), since ONNX Runtime
and faiss open paths; the server then serves the copy. `serving/settings.py` does the same for a
BARLOW_MODEL_DIR given to a plain `bentoml serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline import storage
from pipeline.embed.search import local_index
from pipeline.errors import UserError
from pipeline.runtime import MODEL_FILES, resolve_model_dir  # noqa: F401  (MODEL_FILES: the files of a version)

logger = logging.getLogger(__name__)

SERVICE = "serving.service:Embedder"
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # where the `serving` package lives


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_env(model_dir: str | Path, index_dir: str | Path | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours, plus the BARLOW_* contract and a quiet BentoML. MODEL_DIR is resolved
    to one version folder (bucket URLs downloaded first), which the child serves."""
    if not storage.exists(model_dir):
        raise UserError(f"{model_dir} is not a MODEL_DIR (current.json or model.onnx + model.json); "
                        "run barlow export first")
    model_dir = resolve_model_dir(model_dir)
    if not (model_dir / "model.json").is_file():
        raise UserError(f"{model_dir} is not a MODEL_DIR (model.onnx + model.json); run barlow export first")
    env = dict(os.environ)
    env["BARLOW_MODEL_DIR"] = str(model_dir)
    if index_dir is not None:
        env["BARLOW_INDEX_DIR"] = str(local_index(index_dir).resolve())
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.update(extra or {})
    return env


def serve_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--working-dir", str(PROJECT_ROOT)]


@dataclass
class Server:
    """A running `bentoml serve` child; `stop()` is a graceful SIGTERM, then a kill after `grace`."""

    process: subprocess.Popen
    url: str
    log_path: Path | None = None

    def stop(self, grace: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def wait_ready(url: str, process: subprocess.Popen, timeout: float, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"the server exited with code {process.returncode} before it was ready{log}")
        try:
            # B310 false positive: `url` is the http:// address we built for our own child, never user input
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:  # nosec B310
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise UserError(f"the server at {url} was not ready after {timeout:.0f} s{log}")


def start_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 0, env: dict[str, str] | None = None,
                 index_dir: str | Path | None = None, timeout: float = 180.0,
                 log_file: str | Path | IO | None = None) -> Server:
    """Start `bentoml serve` for MODEL_DIR and return once /readyz is 200 (port 0: a free one).

    `log_file`: a path to write the server's output to (tests), or None to inherit our stdout/stderr.
    The child gets its own session so a terminal's Ctrl-C reaches only us, and we forward it.
    """
    port = port or free_port(host)
    child_env = server_env(model_dir, index_dir or None, env)
    log_path, output = None, None
    if log_file is not None and not hasattr(log_file, "write"):
        log_path = Path(log_file)
        output = open(log_path, "ab")
    elif log_file is not None:
        output = log_file
    process = subprocess.Popen(serve_command(host, port), env=child_env, cwd=PROJECT_ROOT, stdout=output,
                               stderr=subprocess.STDOUT if output else None, start_new_session=True)
    # B104 false positive: a comparison (which address to call a wildcard bind on), not a bind
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # nosec B104
    server = Server(process, f"http://{local}:{port}", log_path)
    try:
        wait_ready(server.url, process, timeout, f"; log: {log_path}" if log_path else "")
    except UserError as exc:
        server.stop(grace=10)
        reason = startup_reason(log_path)
        raise UserError(f"{exc}: {reason}" if reason else str(exc)) from None
    except BaseException:
        server.stop(grace=10)
        raise
    return server


def startup_reason(log_path: Path | None) -> str | None:
    """The sentence a service process logged when it could not start (serving/startup.py), if any."""
    if log_path is None or not log_path.is_file():
        return None
    marker = "cannot start: "
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if marker in line]
    return lines[-1].split(marker, 1)[1].strip() if lines else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="MODEL_DIR written by barlow export (a folder or bucket URL)")
    parser.add_argument("--index", help="INDEX_DIR written by barlow index, a folder or bucket URL (enables /search)")
    # B104 intended: the server runs in a container/pod, reached through its Service; BARLOW_API_TOKEN guards it
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default %(default)s)")  # nosec B104
    parser.add_argument("--port", type=int, default=3000, help="port (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    env = server_env(args.model_dir, args.index)
    process = subprocess.Popen(serve_command(args.host, args.port), env=env, cwd=PROJECT_ROOT,
                               start_new_session=True)
    stopping = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # BentoML drains in-flight requests on SIGTERM

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        logger.info("server stopped (exit code %s)", code)
        return 0 if code in (0, -signal.SIGTERM) else code
    if code != 0:
        raise UserError(f"the server exited with code {code}; see its log above")
    return 0
