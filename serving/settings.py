"""The serving environment (ARCHITECTURE.md, "Serving environment") read once into one object.

Everything the service can be told comes from BARLOW_* variables, so `barlow serve`, a Bento and a
Kubernetes Deployment configure it the same way. A bad value stops startup with one sentence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.data.preprocess import max_pixels_from_env
from pipeline.runtime import usable_cpus  # noqa: F401  (re-exported: the service and benchmarks use it)

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the Bento's src/ when served from a Bento
BUNDLED_MODEL = "models/current"  # where bentofile.yaml packs the MODEL_DIR


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    index_dir: Path | None = None
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else CPU; tensorrt: TensorRT EP, CUDA fallback
    api_token: str = ""  # non-empty: /embed and /embed_base64 need `Authorization: Bearer <token>`
    max_images: int = 64  # per request
    max_pixels: int = 40_000_000  # per image, checked before decoding
    max_body_mb: int = 256  # per request body
    threads: int = 0  # ONNX Runtime intra-op threads on CPU; 0: the CPUs this process may use
    max_inflight_images: int = 128  # per worker, decoding or waiting for the encoder; more: 503 at once
    max_queue_ms: int = 1000  # target wait of an admitted request: admit only what the measured speed clears in it
    body_timeout_s: int = 30  # to read and parse one request body; slower: 408


def env_int(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, not {value!r}") from None
    if number < minimum:
        raise UserError(f"{name} must be at least {minimum}, not {number}")
    return number


def settings_from_env() -> Settings:
    model_dir = os.environ.get("BARLOW_MODEL_DIR", "").strip()
    if not model_dir and (PROJECT_ROOT / BUNDLED_MODEL / "model.json").is_file():
        model_dir = BUNDLED_MODEL  # a Bento served with `bentoml serve TAG` does not get its envs
    if not model_dir:
        raise UserError("BARLOW_MODEL_DIR is not set; point it at a MODEL_DIR written by barlow export")
    device = os.environ.get("BARLOW_DEVICE", "auto").strip().lower() or "auto"
    if device not in DEVICES:
        raise UserError(f"BARLOW_DEVICE must be one of {', '.join(DEVICES)}, not {device!r}")
    index_dir = os.environ.get("BARLOW_INDEX_DIR", "").strip()
    return Settings(
        model_dir=resolve_dir(model_dir),
        index_dir=Path(index_dir) if index_dir else None,
        device=device,
        api_token=os.environ.get("BARLOW_API_TOKEN", "").strip(),
        max_images=env_int("BARLOW_MAX_IMAGES", 64),
        max_pixels=max_pixels_from_env(),
        max_body_mb=env_int("BARLOW_MAX_BODY_MB", 256),
        threads=env_int("BARLOW_THREADS", 0, minimum=0),
        # The cap: two full batches per worker. BARLOW_MAX_QUEUE_MS lowers the bound to what the measured
        # speed clears in that time (2 x 64 images is ~3 s of work for a ResNet-18 on 2 busy CPU cores);
        # 0 keeps the cap fixed.
        max_inflight_images=env_int("BARLOW_MAX_INFLIGHT_IMAGES", 2 * batching_from_env()[0]),
        max_queue_ms=env_int("BARLOW_MAX_QUEUE_MS", 1000, minimum=0),
        body_timeout_s=env_int("BARLOW_BODY_TIMEOUT_S", 30),
    )


def resolve_dir(value: str) -> Path:
    """A relative path is taken from the working directory, else from the project (Bento src) root."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return PROJECT_ROOT / path


def batching_from_env() -> tuple[int, int]:
    """(max batch size, max latency ms) for the adaptive batcher: BARLOW_MAX_BATCH, BARLOW_MAX_LATENCY_MS.

    The latency is a shedding bound (a request that cannot meet it gets 503), not a wait: BentoML
    waits only as long as its fitted cost model says a fuller batch pays off.
    """
    return env_int("BARLOW_MAX_BATCH", 64), env_int("BARLOW_MAX_LATENCY_MS", 10_000)
