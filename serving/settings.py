"""The serving environment: every BARLOW_* variable the service reads, read here once into `Settings`.

`barlow serve`, a Bento and a Kubernetes Deployment configure the service the same way, through
these variables; each has one default, the field's below. A bad value stops startup with one sentence.
BARLOW_MODEL_DIR is resolved to one version folder (`runtime.resolve_model_dir`: current.json ->
versions/<version>/) by the first process that reads it, which writes the resolved folder back into
its environment: the service processes BentoML starts afterwards, a restarted encoder included, inherit
it, so a pointer flip while the server runs never splits it across two models (`barlow serve` resolves
before starting BentoML). BARLOW_MODEL_DIR and BARLOW_INDEX_DIR may be bucket URLs: they are downloaded
to a local cache ($BARLOW_CACHE_DIR) at startup, so a pod can serve a model straight from a bucket.
The offline commands (`barlow embed`, `barlow search`) take flags instead and never read them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline import storage
from pipeline.data.preprocess import DEFAULT_MAX_PIXELS
from pipeline.devices import RUNTIME_DEVICES, runtime_device
from pipeline.embed.search import local_index
from pipeline.errors import UserError
from pipeline.runtime import POINTER, PRECISIONS, resolve_model_dir, usable_cpus

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the Bento's src/ when served from a Bento
BUNDLED_MODEL = "models/current"  # where bentofile.yaml packs the MODEL_DIR
MODEL_DIR_ENV = "BARLOW_MODEL_DIR"
DECODE_PLACES = ("auto", "worker", "encoder")
ENCODER_PLACES = ("auto", "worker", "process")


@dataclass(frozen=True)
class Settings:
    model_dir: Path | None = None  # BARLOW_MODEL_DIR: the MODEL_DIR to serve (required to start)
    index_dir: Path | None = None  # BARLOW_INDEX_DIR: enables /search
    # BARLOW_DEVICE: auto (CUDA when torch sees a GPU) | cpu | cuda | tensorrt; cuda and tensorrt stop the
    # server at startup unless that ONNX Runtime provider is the one running (no silent CPU fallback)
    device: str = "auto"
    # BARLOW_PRECISION: auto (model-fp16.onnx on a GPU provider when the export wrote it, else model.onnx)
    # | fp32 | fp16 (refused at startup without model-fp16.onnx or a GPU provider)
    precision: str = "auto"
    api_token: str = ""  # BARLOW_API_TOKEN: non-empty: /embed, /embed_base64, /search need `Bearer <token>`
    max_images: int = 64  # BARLOW_MAX_IMAGES: per request
    max_pixels: int = DEFAULT_MAX_PIXELS  # BARLOW_MAX_PIXELS: per image, checked before decoding
    max_body_mb: int = 256  # BARLOW_MAX_BODY_MB: per request body
    # BARLOW_ENCODER: where the ONNX Runtime session runs (serving/encoder.py): worker (in each HTTP worker)
    # | process (its own process behind BentoML's adaptive batcher) | auto (worker on the CPU, else process)
    encoder: str = "auto"
    # BARLOW_THREADS: ONNX Runtime intra-op threads of a session on CPU; 0: session_threads says how many
    threads: int = 0
    # BARLOW_WORKERS: HTTP worker processes; 0: http_workers says how many
    workers: int = 0
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
    # BARLOW_DECODE: where images are decoded: worker (PIL in the HTTP workers) | encoder (JPEGs on the
    # model's device, pipeline/data/device_decode.py) | auto (encoder when it runs CUDA/TensorRT)
    decode: str = "auto"
    # BARLOW_ACCESS_LOG: 1 logs a line per request (BentoML's access log); 0: off, since at hundreds of
    # requests/s the log line costs CPU the model needs, and barlow_request_seconds{route,status} counts them
    access_log: int = 0

    @property
    def inflight_limit(self) -> int:
        return self.max_inflight_images or 2 * self.max_batch

    def encoder_place(self) -> str:
        """BARLOW_ENCODER resolved: `worker` or `process` (serving/encoder.py says what each is); auto is
        worker when the device is the CPU. A GPU named in BARLOW_DEVICE is taken at its word here: the
        encoder checks that it is there when it starts, and stops the server with a reason if not."""
        if self.encoder != "auto":
            return self.encoder
        device = self.device if self.device != "auto" else runtime_device("auto")
        return "worker" if device == "cpu" else "process"

    def http_workers(self) -> int:
        """BARLOW_WORKERS, or with 0: with the encoder in its own process, the usable CPUs less one (at
        least 1). Each worker is one event loop on one CPU (parsing, header checks, PIL decoding in worker
        mode, JSON); the CPU left over is the encoder process's, which must never wait for one to feed the
        GPU (unpickling, nvJPEG's host-side Huffman decoding, kernel launches). With the encoder in the
        worker (a CPU host): one worker, whose sessions take every CPU while its event loop handles requests."""
        if self.workers:
            return self.workers
        return 1 if self.encoder_place() == "worker" else max(1, usable_cpus() - 1)

    def session_threads(self) -> int:
        """ONNX Runtime intra-op threads of one session: BARLOW_THREADS, or with 0: one per session when the
        sessions run in the workers (the CPU is shared out as sessions, not threads: a session's parallel
        steps wait for their slowest thread, and on cores the HTTP path also uses, that thread is often
        preempted), else the CPUs the encoder process may use (OnnxModel's default)."""
        if self.threads or self.encoder_place() != "worker":
            return self.threads
        return 1

    def sessions_per_worker(self) -> int:
        """With the encoder in the worker: sessions side by side in each worker, together one thread per
        usable CPU (at least 1). With the encoder in its own process: that process's one session."""
        if self.encoder_place() != "worker":
            return 1
        return max(1, usable_cpus() // (self.http_workers() * self.session_threads()))

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


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def settings_from_env() -> Settings:
    model_dir = os.environ.get("BARLOW_MODEL_DIR", "").strip()
    bundled = PROJECT_ROOT / BUNDLED_MODEL
    if not model_dir and ((bundled / "model.json").is_file() or (bundled / POINTER).is_file()):
        model_dir = BUNDLED_MODEL  # a Bento served with `bentoml serve TAG` does not get its envs
    device = env_choice("BARLOW_DEVICE", RUNTIME_DEVICES, DEFAULTS["device"])
    precision = env_choice("BARLOW_PRECISION", PRECISIONS, DEFAULTS["precision"])
    index_dir = os.environ.get("BARLOW_INDEX_DIR", "").strip()
    encoder = env_choice("BARLOW_ENCODER", ENCODER_PLACES, DEFAULTS["encoder"])
    decode = env_choice("BARLOW_DECODE", DECODE_PLACES, DEFAULTS["decode"])
    ints = {name: env_int(f"BARLOW_{name.upper()}", DEFAULTS[name], minimum)
            for name, minimum in (("max_images", 1), ("max_pixels", 1), ("max_body_mb", 1), ("threads", 0),
                                  ("workers", 0), ("max_batch", 1), ("max_latency_ms", 1),
                                  ("max_inflight_images", 0), ("max_queue_ms", 0), ("body_timeout_s", 1),
                                  ("inline_pixels", 0), ("pad_batches", -1), ("access_log", 0))}
    served = pin_model_dir(model_dir) if model_dir else None
    if storage.is_url(index_dir):
        index_dir = str(local_index(index_dir))
    return Settings(model_dir=served, index_dir=Path(index_dir) if index_dir else None, device=device,
                    precision=precision, encoder=encoder, decode=decode,
                    api_token=os.environ.get("BARLOW_API_TOKEN", "").strip(), **ints)


def pin_model_dir(value: str) -> Path:
    """The version folder BARLOW_MODEL_DIR resolves to, written back to BARLOW_MODEL_DIR so that every
    process started from this one loads that version (a resolved folder resolves to itself). A local
    folder without current.json is taken as it is; loading it says what is missing."""
    folder = resolve_dir(value) if not storage.is_url(value) else None
    if folder is None or (folder / POINTER).is_file():
        folder = resolve_model_dir(folder or value)
    os.environ[MODEL_DIR_ENV] = str(folder)
    return folder


def resolve_dir(value: str) -> Path:
    """A relative path is taken from the working directory, else from the project (Bento src) root."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return PROJECT_ROOT / path
