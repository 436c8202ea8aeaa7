"""MODEL_DIR -> a ready ONNX Runtime session: providers, threads, warm-up.

The code lives in `pipeline.runtime`, shared with `barlow embed` and `barlow search`, so the served
and the batch embeddings come from one provider choice and one session setup; this module keeps the
service's import path.
"""

from pipeline.runtime import MODEL_FORMAT, OnnxEncoder, execution_providers, gpu_available, load_model_info

__all__ = ["MODEL_FORMAT", "OnnxEncoder", "execution_providers", "gpu_available", "load_model_info"]
