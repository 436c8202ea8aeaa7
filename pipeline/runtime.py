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

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.devices import runtime_device
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

MODEL_FORMAT = "barlow-embed/model/1"


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


def load_model_info(model_dir: Path) -> dict[str, Any]:
    """model.json of a MODEL_DIR, checked enough that the service can trust its fields."""
    path = Path(model_dir) / "model.json"
    if not (Path(model_dir) / "model.onnx").is_file():
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

    def __init__(self, model_dir: Path, device: str = "auto", threads: int = 0, max_batch: int = 64):
        import onnxruntime as ort

        self.info = load_model_info(model_dir)
        self.image_size, self.dim = int(self.info["image_size"]), int(self.info["dim"])
        self.precision = str(self.info.get("precision", "fp32"))  # export writes it when not fp32
        self.requested = device
        self.device = runtime_device(device)
        if device == "auto":
            logger.info("device auto: %s", "cuda (torch sees a GPU)" if self.device == "cuda"
                        else "cpu (torch sees no GPU)")
        providers = execution_providers(self.device, self.image_size, max_batch, Path(model_dir) / ".trt-cache")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1
        # Spinning threads would steal the CPU that request handlers and decode workers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            raise UserError(f"{Path(model_dir) / 'model.onnx'} is not a loadable ONNX model: "
                            f"{str(exc).splitlines()[0][:200]}") from None
        self.providers = self.session.get_providers()
        check_active(PROVIDERS[self.device], self.providers[0], explicit=device != "auto",
                     available=ort.get_available_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        logger.info("model %s (dim %d, %d px, sha256 %s) on %s with %d CPU threads", self.info["name"], self.dim,
                    self.image_size, self.info.get("onnx_sha256", "?")[:12], ", ".join(self.providers),
                    options.intra_op_num_threads)

    @property
    def provider(self) -> str:
        """The provider that runs the graph (ORT assigns every node it can to the first one)."""
        return self.providers[0]

    def runtime(self) -> dict[str, Any]:
        """What runs, for /model and the barlow_encoder_info metric."""
        return {"provider": self.provider, "providers": list(self.providers), "device": self.device,
                "requested_device": self.requested, "precision": self.precision}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]

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
