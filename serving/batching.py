"""Fixed batch shapes for GPU sessions: pad each adaptive batch up to the next bucket size.

Adaptive batches come in every size from 1 to the maximum. On CUDA, ONNX Runtime pays per new input
shape (cuDNN algorithm choice, memory planning), so a stream of changing sizes runs far below the
fixed-shape speed. Padding to a few bucket sizes (powers of two up to the maximum), each warmed at
startup, keeps the shapes known; the zero rows cost little on a GPU and are dropped from the output.
On CPU the padding would be pure extra work, so it is only used for GPU providers.
"""

from __future__ import annotations

import numpy as np

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def bucket_for(count: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `count` rows (the count itself beyond the largest)."""
    return next((size for size in buckets if size >= count), count)


def pad_rows(images: np.ndarray, size: int) -> np.ndarray:
    if len(images) >= size:
        return images
    padding = np.zeros((size - len(images), *images.shape[1:]), dtype=images.dtype)
    return np.concatenate([images, padding])
