"""A real S3 HTTP endpoint on 127.0.0.1 for tests: moto's server mode, started as a child process.

`S3Server.start()` picks a free port, waits until the endpoint answers, and `env()` gives the
standard AWS variables (AWS_ENDPOINT_URL and fake keys) that s3fs, boto3 and our child processes
read, so the code under test runs exactly as against MinIO or AWS.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    port: int
    process: subprocess.Popen
    log: object = field(default=None)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    @classmethod
    def start(cls, log_path=None, extra_env: dict[str, str] | None = None) -> "S3Server":
        port = _free_port()
        log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        env = {**os.environ, **(extra_env or {})}
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        server = cls(port, process, log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}")
            try:
                urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=1).close()
                return server
            except OSError:
                time.sleep(0.2)
        server.stop()
        raise RuntimeError("moto server did not answer within 60 s")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def reset(self) -> None:
        """Empty every bucket (moto's reset API), so tests sharing one server start clean."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if hasattr(self.log, "close"):
            self.log.close()
