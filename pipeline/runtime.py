"""MODEL_DIR -> a ready ONNX Runtime session: providers, threads, warm-up.

Shared by the service (`serving/`) and the offline commands (`barlow embed`, `barlow search`), so
the served and the batch embeddings run the same graph on the same providers. CUDA (or TensorRT when
asked) when torch sees a GPU, else CPU with one intra-op thread per usable CPU. A device asked for by
name (cuda, tensorrt) must be the provider ONNX Runtime actually runs, else OnnxModel raises: ORT itself
falls back to the CPU with only a log line when a provider cannot load (CUDA libraries missing).
`get_available_providers()` lists CUDA even on CPU-only machines, so it is never the GPU test;
`import torch` also loads the CUDA/cuDNN libraries onnxruntime-gpu needs. TF32 stays off so the GPU
embedding matches the torch FeatureExtractor within the export's parity tolerance. onnxruntime is imported
only when a session is made, so `pipeline` imports without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import storage
from pipeline.devices import runtime_device
from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MODEL_FORMAT = "barlow-embed/model/1"
POINTER_FORMAT = "barlow-embed/model-pointer/1"
POINTER = "current.json"  # MODEL_DIR/current.json names the version to load
VERSIONS = "versions"  # MODEL_DIR/versions/<version>/ holds one complete export
MODEL_FILE, FP16_FILE, INFO_FILE = "model.onnx", "model-fp16.onnx", "model.json"
MODEL_FILES = (MODEL_FILE, INFO_FILE)
PRECISIONS = ("auto", "fp32", "fp16")
VERSION_PATTERN = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]*")


def usable_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def read_pointer(model_dir: str | Path) -> dict[str, Any] | None:
    """MODEL_DIR/current.json checked (None when there is none: a legacy flat MODEL_DIR)."""
    location = storage.join(model_dir, POINTER)
    if not storage.exists(location):
        return None
    text = storage.read_text(location)
    try:
        pointer = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{location} is not valid JSON: {exc}") from None
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT \
            or not VERSION_PATTERN.fullmatch(str(pointer.get("version", ""))):
        raise UserError(f"{location} is not a {POINTER_FORMAT} pointer with a version name")
    return pointer


def resolve_model_dir(model_dir: str | Path) -> Path:
    """The local folder to load for MODEL_DIR (a folder or bucket URL), resolved once by the caller.

    MODEL_DIR/current.json names MODEL_DIR/versions/<version>/; without it MODEL_DIR itself is the
    folder (a legacy flat MODEL_DIR, or a version folder already resolved: resolving is idempotent).
    A bucket's folder is downloaded first (`storage.local_copy`, one cache folder per version). Readers
    keep the returned path: a version folder never changes, so a later pointer flip cannot mix models.
    """
    pointer = read_pointer(model_dir)
    folder = storage.join(model_dir, VERSIONS, pointer["version"]) if pointer else str(model_dir)
    if storage.is_url(folder):
        names = None if pointer else MODEL_FILES + ((FP16_FILE,) if storage.exists(
            storage.join(folder, FP16_FILE)) else ())
        local = storage.local_copy(folder, names)
    else:
        local = storage.local_path(folder).resolve()
    if not (local / MODEL_FILE).is_file():
        where = f"{folder} (named by {storage.join(model_dir, POINTER)})" if pointer else str(model_dir)
        raise UserError(f"{where} has no {MODEL_FILE}; create it with barlow export RUN_DIR --out {model_dir}")
    return local


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_file(model_dir: Path, info: dict[str, Any], precision: str, device: str,
               available: list[str]) -> tuple[str, Path]:
    """(precision, ONNX file) to load from a resolved model folder.

    auto: model-fp16.onnx when the device is a GPU provider that this onnxruntime has and the file exists
    (ONNX Runtime's CPU provider would cast every fp16 node back to float32), else model.onnx. fp16 asked
    for by name without the file or without a GPU provider is refused.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    fp16 = Path(model_dir) / FP16_FILE
    gpu = device in ("cuda", "tensorrt") and PROVIDERS[device] in available
    if precision == "fp16":
        if not fp16.is_file():
            raise UserError(f"fp16 was asked for but {model_dir} has no {FP16_FILE}; "
                            "export it with barlow export --precision both")
        if not gpu:
            raise UserError(f"fp16 was asked for but the device is {device} without a GPU provider in this "
                            "onnxruntime; fp16 runs on cuda or tensorrt (use fp32 or auto on the CPU)")
    if precision == "fp16" or (precision == "auto" and gpu and fp16.is_file()):
        return "fp16", fp16
    return str(info.get("precision", "fp32")), Path(model_dir) / MODEL_FILE


def check_file(path: Path, info: dict[str, Any]) -> str:
    """sha256 of the ONNX file to load, refused when it is not the one model.json describes."""
    digest = sha256_file(path)
    expected = (info.get("fp16") or {}).get("sha256") if path.name == FP16_FILE else info.get("onnx_sha256")
    if expected and digest != expected:
        raise UserError(f"{path} (sha256 {digest[:12]}) is not the file its model.json describes (sha256 "
                        f"{expected[:12]}): the folder was rewritten or edited; re-run barlow export")
    return digest


def load_model_info(model_dir: Path) -> dict[str, Any]:
    """model.json of a resolved model folder (`resolve_model_dir`), checked enough that the service can trust it."""
    path = Path(model_dir) / "model.json"
    if not (Path(model_dir) / "model.onnx").is_file():
        if (Path(model_dir) / POINTER).is_file():
            raise UserError(f"{model_dir} is a versioned MODEL_DIR; load the folder resolve_model_dir gives")
        raise UserError(f"{model_dir} has no model.onnx; create it with barlow export RUN_DIR --out {model_dir}")
    try:
        info = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != MODEL_FORMAT:
        raise UserError(f"{path} is not a {MODEL_FORMAT} model.json")
    return info


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def execution_providers(device: str, image_size: int, max_batch: int, cache_dir: Path) -> list[Any]:
    """ONNX Runtime providers for a resolved `device` (cpu | cuda | tensorrt), most preferred first."""
    cpu = "CPUExecutionProvider"
    device = runtime_device(device)
    if device == "cpu":
        return [cpu]
    # HEURISTIC: with adaptive batching every new batch size would otherwise re-run the exhaustive search.
    cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"})
    if device == "cuda":
        return [cuda, cpu]
    shape = f"3x{image_size}x{image_size}"
    tensorrt = ("TensorrtExecutionProvider", {
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
        "trt_profile_min_shapes": f"images:1x{shape}", "trt_profile_opt_shapes": f"images:{max_batch}x{shape}",
        "trt_profile_max_shapes": f"images:{max_batch}x{shape}"})
    return [tensorrt, cuda, cpu]


class OnnxModel:
    """uint8 RGB [N, 3, S, S] -> float32 [N, D] backbone embeddings (not normalised)."""

    def __init__(self, model_dir: Path, device: str = "auto", threads: int = 0, max_batch: int = 64,
                 precision: str = "auto"):
        import onnxruntime as ort

        self.info = load_model_info(model_dir)
        self.image_size, self.dim = int(self.info["image_size"]), int(self.info["dim"])
        self.requested = device
        self.device = runtime_device(device)
        self.precision, self.onnx_path = model_file(model_dir, self.info, precision, self.device,
                                                    ort.get_available_providers())
        self.onnx_sha256 = check_file(self.onnx_path, self.info)  # of the file loaded, for /model
        if device == "auto":
            logger.info("device auto: %s", "cuda (torch sees a GPU)" if self.device == "cuda"
                        else "cpu (torch sees no GPU)")
        providers = execution_providers(self.device, self.image_size, max_batch, Path(model_dir) / ".trt-cache")
        options = ort.SessionOptions()
        self.threads = options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1
        # Spinning threads would steal the CPU that request handlers and decode workers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            raise UserError(f"{self.onnx_path} is not a loadable ONNX model: "
                            f"{str(exc).splitlines()[0][:200]}") from None
        self.providers = self.session.get_providers()
        check_active(PROVIDERS[self.device], self.providers[0], explicit=device != "auto",
                     available=ort.get_available_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        logger.info("model %s (dim %d, %d px, sha256 %s) on %s with %d CPU threads", self.info["name"], self.dim,
                    self.image_size, self.onnx_sha256[:12], ", ".join(self.providers),
                    options.intra_op_num_threads)

    @property
    def provider(self) -> str:
        """The provider that runs the graph (ORT assigns every node it can to the first one)."""
        return self.providers[0]

    def runtime(self) -> dict[str, Any]:
        """What runs, for /model and the barlow_encoder_info metric: `sha256` is of the ONNX file loaded."""
        return {"provider": self.provider, "providers": list(self.providers), "device": self.device,
                "requested_device": self.requested, "precision": self.precision, "threads": self.threads,
                "version": self.info.get("version"), "file": self.onnx_path.name, "sha256": self.onnx_sha256}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] torch tensor -> float32 [N, D] torch tensor on the same device, through ONNX
        Runtime's IO binding: the session reads the tensor's memory and writes into a preallocated
        output, so pixels decoded on the GPU never go through host memory. CPU tensors take the same path."""
        import torch

        images = images.contiguous()
        device = images.device
        kind, index = ("cuda", device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else ("cpu", 0)
        output = self.session.get_outputs()[0]
        out_dtype = torch.float16 if output.type == "tensor(float16)" else torch.float32
        embeddings = torch.empty((images.shape[0], self.dim), dtype=out_dtype, device=device)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, kind, index, np.uint8, tuple(images.shape), images.data_ptr())
        binding.bind_output(self.output_name, kind, index, np.float16 if out_dtype == torch.float16 else np.float32,
                            tuple(embeddings.shape), embeddings.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(device).synchronize()  # ORT runs on its own stream: the pixels must be there
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return embeddings.float()

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Run the first inferences (allocations, kernel selection) before any client waits on them."""
        start = time.perf_counter()
        for batch in batch_sizes:
            self(np.zeros((batch, 3, self.image_size, self.image_size), dtype=np.uint8))
        seconds = time.perf_counter() - start
        logger.info("warm-up at batch %s took %.2f s", ",".join(map(str, batch_sizes)), seconds)
        return seconds


def check_active(wanted: str, active: str, explicit: bool, available: list[str]) -> None:
    """Refuse a device asked for by name whose provider is not the one running; with `auto`, say so.

    ORT logs a provider it cannot load and silently runs the graph on the next one (the CPU), which
    would serve at a fraction of the speed the device was chosen for.
    """
    if active == wanted:
        return
    if wanted not in available:
        cause = f"this onnxruntime has no {wanted} (install onnxruntime-gpu, not onnxruntime)"
    else:
        cause = ("it failed to load: no GPU visible to this process or CUDA/cuDNN libraries missing or not "
                 "the versions this onnxruntime-gpu needs (ONNX Runtime's error above says which)")
    if explicit:
        raise UserError(f"{wanted} was asked for but ONNX Runtime runs {active}: {cause}")
    logger.warning("%s is not running (ONNX Runtime runs %s): %s", wanted, active, cause)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (zero rows stay zero): what /embed returns by default, what the index
    stores, and what makes cosine similarity an inner product."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
