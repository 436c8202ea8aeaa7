"""The one choice of device: for torch (training, evaluation) and for ONNX Runtime (serving, embedding).

`auto` is CUDA when torch sees a GPU, else the CPU. A device asked for by name that is not there is
an error, never a silent fallback. torch is the GPU test for ONNX Runtime too: onnxruntime-gpu lists
its CUDA provider even on machines without a GPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

TORCH_DEVICES = ("auto", "cpu", "cuda")  # cuda:N is accepted too
RUNTIME_DEVICES = ("auto", "cpu", "cuda", "tensorrt")  # tensorrt: TensorRT provider, then CUDA, then CPU


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; 0 without torchrun): the index of its GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def gpu_available() -> bool:
    try:
        import torch
    except ImportError:  # a slim CPU image may not carry torch
        return False
    return torch.cuda.is_available()


def torch_device(name: str = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch device; plain `cuda` is this process's GPU (LOCAL_RANK)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name} asked for, but torch sees no GPU")
        return torch.device(name) if ":" in name else torch.device("cuda", local_rank())
    raise UserError(f"the device must be one of {', '.join(TORCH_DEVICES)} or cuda:N, not {name!r}")


def runtime_device(name: str) -> str:
    """auto | cpu | cuda | tensorrt -> the ONNX Runtime device to use: cpu, cuda or tensorrt."""
    if name not in RUNTIME_DEVICES:
        raise UserError(f"the device must be one of {', '.join(RUNTIME_DEVICES)}, not {name!r}")
    if name == "auto":
        return "cuda" if gpu_available() else "cpu"
    if name != "cpu" and not gpu_available():
        raise UserError(f"device {name} asked for, but torch sees no CUDA GPU")
    return name
