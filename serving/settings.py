"""The serving environment: every BARLOW_* variable the service reads, read here once into `Settings`.

`barlow serve`, a Bento and a Kubernetes Deployment configure the service the same way, through
these variables; each has one default, the field's below. A bad value stops startup with one sentence.
BARLOW_MODEL_DIR and BARLOW_INDEX_DIR may be bucket URLs: they are downloaded to a local cache
($BARLOW_CACHE_DIR) at startup, so a pod can serve a model straight from a bucket.
The offline commands (`barlow embed`, `barlow search`) take flags instead and never read them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline import storage
from pipeline.data.preprocess import DEFAULT_MAX_PIXELS
from pipeline.devices import RUNTIME_DEVICES
from pipeline.embed.search import local_index
from pipeline.errors import UserError
from pipeline.serve import MODEL_FILES

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the Bento's src/ when served from a Bento
BUNDLED_MODEL = "models/current"  # where bentofile.yaml packs the MODEL_DIR


@dataclass(frozen=True)
class Settings:
    model_dir: Path | None = None  # BARLOW_MODEL_DIR: the MODEL_DIR to serve (required to start)
    index_dir: Path | None = None  # BARLOW_INDEX_DIR: enables /search
    # BARLOW_DEVICE: auto (CUDA when torch sees a GPU) | cpu | cuda | tensorrt; cuda and tensorrt stop the
    # server at startup unless that ONNX Runtime provider is the one running (no silent CPU fallback)
    device: str = "auto"
    api_token: str = ""  # BARLOW_API_TOKEN: non-empty: /embed, /embed_base64, /search need `Bearer <token>`
    max_images: int = 64  # BARLOW_MAX_IMAGES: per request
    max_pixels: int = DEFAULT_MAX_PIXELS  # BARLOW_MAX_PIXELS: per image, checked before decoding
    max_body_mb: int = 256  # BARLOW_MAX_BODY_MB: per request body
    threads: int = 0  # BARLOW_THREADS: ONNX Runtime intra-op threads on CPU; 0: the CPUs this process may use
    workers: int = 1  # BARLOW_WORKERS: HTTP worker processes
    max_batch: int = 64  # BARLOW_MAX_BATCH: largest adaptive batch
    # BARLOW_MAX_LATENCY_MS: a shedding bound (a request that cannot meet it gets 503), not a wait:
    # BentoML waits only as long as its fitted cost model says a fuller batch pays off.
    max_latency_ms: int = 10_000
    # BARLOW_MAX_INFLIGHT_IMAGES: per worker, decoding or waiting for the encoder; more: 503 at once.
    # 0: two full batches (2 x max_batch).
    max_inflight_images: int = 0
    max_queue_ms: int = 1000  # BARLOW_MAX_QUEUE_MS: admit only what the measured speed clears in this; 0: off
    body_timeout_s: int = 30  # BARLOW_BODY_TIMEOUT_S: to read and parse one request body; slower: 408
    # BARLOW_INLINE_PIXELS: requests with fewer pixels are decoded on the event loop (a thread hand-off
    # costs more than decoding a small image); bigger ones in a decoder thread.
    inline_pixels: int = 2_000_000
    pad_batches: int = -1  # BARLOW_PAD_BATCHES: 1/0 pad batches to warmed bucket shapes; -1: on GPU providers

    @property
    def inflight_limit(self) -> int:
        return self.max_inflight_images or 2 * self.max_batch

    def served_model_dir(self) -> Path:
        if self.model_dir is None:
            raise UserError("BARLOW_MODEL_DIR is not set; point it at a MODEL_DIR written by barlow export")
        return self.model_dir


DEFAULTS = {f.name: f.default for f in fields(Settings)}


def env_int(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)  # 4e7 is an integer too
    except ValueError:
        number = math.nan
    if not number.is_integer():
        raise UserError(f"{name} must be an integer, not {value!r}")
    number = int(number)
    if number < minimum:
        raise UserError(f"{name} must be at least {minimum}, not {number}")
    return number


def settings_from_env() -> Settings:
    model_dir = os.environ.get("BARLOW_MODEL_DIR", "").strip()
    if not model_dir and (PROJECT_ROOT / BUNDLED_MODEL / "model.json").is_file():
        model_dir = BUNDLED_MODEL  # a Bento served with `bentoml serve TAG` does not get its envs
    device = os.environ.get("BARLOW_DEVICE", "").strip().lower() or DEFAULTS["device"]
    if device not in RUNTIME_DEVICES:
        raise UserError(f"BARLOW_DEVICE must be one of {', '.join(RUNTIME_DEVICES)}, not {device!r}")
    index_dir = os.environ.get("BARLOW_INDEX_DIR", "").strip()
    ints = {name: env_int(f"BARLOW_{name.upper()}", DEFAULTS[name], minimum)
            for name, minimum in (("max_images", 1), ("max_pixels", 1), ("max_body_mb", 1), ("threads", 0),
                                  ("workers", 1), ("max_batch", 1), ("max_latency_ms", 1),
                                  ("max_inflight_images", 0), ("max_queue_ms", 0), ("body_timeout_s", 1),
                                  ("inline_pixels", 0), ("pad_batches", -1))}
    if storage.is_url(model_dir):
        model_dir = str(storage.local_copy(model_dir, MODEL_FILES))
    if storage.is_url(index_dir):
        index_dir = str(local_index(index_dir))
    return Settings(model_dir=resolve_dir(model_dir) if model_dir else None,
                    index_dir=Path(index_dir) if index_dir else None, device=device,
                    api_token=os.environ.get("BARLOW_API_TOKEN", "").strip(), **ints)


def resolve_dir(value: str) -> Path:
    """A relative path is taken from the working directory, else from the project (Bento src) root."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return PROJECT_ROOT / path
