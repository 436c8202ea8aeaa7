"""The encoder: the ONNX Runtime session, its batch shapes and its decoder, wherever it runs.

BARLOW_ENCODER says where that is (`Settings.encoder_place`):

- `process`: its own BentoML service process (service.BatchedModel), behind BentoML's adaptive
  batcher, which every HTTP worker calls over a private socket. One session per GPU, fed by several
  workers, and decoding on the GPU: the place for CUDA and TensorRT.
- `worker`: inside each HTTP worker, as single-threaded sessions side by side, each called from a
  thread of its own while the worker's event loop goes on parsing the next requests. On a CPU the
  model and the HTTP handling share the same cores: the hop to a second process (pickling, a second
  HTTP request and batcher) costs CPU per request, and a multi-threaded session's parallel steps wait
  for whichever of its threads the HTTP path has preempted.

`auto` is `worker` when the device resolves to the CPU, else `process`. Both places run this class,
so both give the same embeddings and the same per-image errors.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from PIL import Image

from pipeline.data.device_decode import sample_jpeg
from pipeline.runtime import OnnxModel
from serving import metrics
from serving.batching import GPU_PROVIDERS, bucket_for, bucket_sizes, pad_rows
from serving.settings import Settings

logger = logging.getLogger(__name__)


def decode_place(setting: str, provider: str) -> str:
    """BARLOW_DECODE resolved: `worker` or `encoder`; auto decodes in the encoder when it runs on a GPU
    (nvJPEG there is far faster than PIL in the workers), else in the workers (on a CPU the encoder's
    CPUs are the model's, and the workers' decoding runs beside it)."""
    if setting != "auto":
        return setting
    return "encoder" if provider in GPU_PROVIDERS else "worker"


class Encoder:
    """uint8 arrays or JPEG items -> float32 embeddings, warmed up at every batch shape it will see."""

    def __init__(self, settings: Settings):
        self.max_pixels = settings.max_pixels
        self.model = OnnxModel(settings.served_model_dir(), settings.device, settings.session_threads(),
                               settings.max_batch, precision=settings.precision)
        runtime = self.model.runtime()
        metrics.ENCODER_INFO.labels(runtime["provider"], runtime["device"], runtime["precision"]).set(1)
        pad = settings.pad_batches if settings.pad_batches >= 0 else self.model.provider in GPU_PROVIDERS
        self.buckets = bucket_sizes(settings.max_batch) if pad else ()
        self.model.warm_up(self.buckets or (1,))
        Image.MAX_IMAGE_PIXELS = settings.max_pixels  # the PIL fallback of encoder decoding agrees with the workers
        self.decode_device = None
        if decode_place(settings.decode, self.model.provider) == "encoder":
            self.warm_decoder()

    def runtime(self) -> dict:
        """{provider, providers, device, requested_device, precision, ...}: what runs (for /model)."""
        return self.model.runtime()

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, S, S] -> float32 [N, D]."""
        count = len(images)
        if self.buckets:
            images = pad_rows(images, bucket_for(count, self.buckets))
        start = time.perf_counter()
        embeddings = self.model(images)[:count]
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.observe(count)
        return embeddings

    def encode_items(self, items: list) -> list:
        """Each item a JPEG (bytes, EXIF orientation) decoded here on the model's device, or a uint8
        [3, S, S] array a worker decoded (pipeline/data/device_decode.py) -> per item a float32 [D]
        embedding, or a {status, reason, message} dict for an image that could not be decoded (its row
        is computed and dropped: the batch goes on without it)."""
        from pipeline.data.device_decode import decode_batch

        if self.decode_device is None:  # BARLOW_DECODE=worker here, yet a worker sent bytes: serve it anyway
            self.warm_decoder()
        count = len(items)
        rows = bucket_for(count, self.buckets) if self.buckets else count
        start = time.perf_counter()
        images, errors = decode_batch(items, self.model.image_size, self.decode_device, rows, self.max_pixels)
        decoded = time.perf_counter()
        embeddings = self.model.embed_tensor(images)[:count].cpu().numpy()
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - decoded)
        metrics.ENCODER_DECODE_SECONDS.observe(decoded - start)
        metrics.BATCH_SIZE.observe(count)
        return [{"status": errors[i].status, "reason": errors[i].reason, "message": str(errors[i])}
                if i in errors else embeddings[i] for i in range(count)]

    def warm_decoder(self) -> None:
        """Pick the decode device (the model's) and run the first decode (nvJPEG sets itself up) and
        the IO-bound inference at every warmed batch shape, before any client waits on them."""
        import torch

        self.decode_device = torch.device("cuda" if self.model.provider in GPU_PROVIDERS else "cpu")
        start = time.perf_counter()
        for rows in self.buckets or (1,):
            self.encode_items([(sample_jpeg(), 1)] * rows)
        logger.info("decoding JPEGs in the encoder on %s (warm-up %.2f s)", self.decode_device,
                    time.perf_counter() - start)
