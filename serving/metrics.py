"""The service's own Prometheus metrics (`barlow_*`), beside BentoML's `bentoml_service_*`.

Plain prometheus_client objects at module level: BentoML sets PROMETHEUS_MULTIPROC_DIR before it
starts workers, so every worker process writes its own file and /metrics sums them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

IMAGES_EMBEDDED = Counter("barlow_images_embedded", "Images embedded and returned to clients")
REJECTED_INPUTS = Counter("barlow_rejected_inputs", "Requests or images rejected, by reason", ["reason"])
PREPROCESS_SECONDS = Histogram(
    "barlow_preprocess_seconds", "Decode, validate and preprocess the images of one request",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ENCODER_DECODE_SECONDS = Histogram(
    "barlow_encoder_decode_seconds", "BARLOW_DECODE=encoder: host time to decode, orient, resize and crop one "
    "batch on the model's device (on CUDA, kernels still running count in barlow_inference_seconds)", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
INFERENCE_SECONDS = Histogram(
    "barlow_inference_seconds", "ONNX Runtime time for one adaptive batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_SIZE = Histogram(
    "barlow_batch_size", "Images per adaptive batch sent to ONNX Runtime",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
MODEL_INFO = Gauge(
    "barlow_model_info", "The served model (value 1)", ["name", "sha256", "dim"], multiprocess_mode="max")
ENCODER_INFO = Gauge(
    "barlow_encoder_info", "What runs the model in the encoder process (value 1): the ONNX Runtime provider "
    "that is active, the device (cpu, cuda, tensorrt) and the model's precision", ["provider", "device", "precision"],
    multiprocess_mode="max")
SHED_REQUESTS = Counter(
    "barlow_shed_requests", "Requests answered 503 without an embedding, by reason "
    "(in_flight_limit, encoder_overloaded, encoder_unreachable)", ["reason"])
IN_FLIGHT_IMAGES = Gauge(
    "barlow_in_flight_images", "Images admitted and not yet answered (decoding or waiting for the encoder)",
    multiprocess_mode="livesum")
REQUEST_SECONDS = Histogram(
    "barlow_request_seconds", "Server-side time of one API request, from the app seeing it to its last response "
    "byte (what a client waits on top: the socket and the event loop's backlog), by route and status",
    ["route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60))
ADMISSION_LIMIT = Gauge(
    "barlow_admission_limit", "Images the workers admit in flight now (BARLOW_MAX_INFLIGHT_IMAGES, or less "
    "to keep the wait near BARLOW_MAX_QUEUE_MS at the measured speed)", multiprocess_mode="livesum")
