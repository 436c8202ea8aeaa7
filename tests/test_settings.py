"""serving/settings.py: every BARLOW_* variable of the service, read once, one default each."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pipeline.errors import UserError
from serving.settings import DEFAULTS, Settings, settings_from_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("BARLOW_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_without_any_variable(clean_env):
    settings = settings_from_env()
    assert settings.model_dir is None and settings.index_dir is None
    assert {f.name: getattr(settings, f.name) for f in dataclasses.fields(Settings)} == DEFAULTS
    assert settings.inflight_limit == 2 * settings.max_batch  # one default, derived from the batch
    with pytest.raises(UserError, match="BARLOW_MODEL_DIR is not set"):
        settings.served_model_dir()


def test_every_variable_is_read(clean_env, tmp_path):
    values = {"BARLOW_MODEL_DIR": str(tmp_path), "BARLOW_INDEX_DIR": str(tmp_path / "i"), "BARLOW_DEVICE": "CPU",
              "BARLOW_PRECISION": "FP32",
              "BARLOW_API_TOKEN": " t ", "BARLOW_MAX_IMAGES": "3", "BARLOW_MAX_PIXELS": "1e6", "BARLOW_MAX_BODY_MB": "5",
              "BARLOW_THREADS": "2", "BARLOW_WORKERS": "4", "BARLOW_MAX_BATCH": "16", "BARLOW_MAX_LATENCY_MS": "500",
              "BARLOW_MAX_INFLIGHT_IMAGES": "7", "BARLOW_MAX_QUEUE_MS": "0", "BARLOW_BODY_TIMEOUT_S": "9",
              "BARLOW_INLINE_PIXELS": "0", "BARLOW_PAD_BATCHES": "1", "BARLOW_DECODE": " Encoder ",
              "BARLOW_ENCODER": "Process", "BARLOW_ACCESS_LOG": "1"}
    for name, value in values.items():
        clean_env.setenv(name, value)
    assert settings_from_env() == Settings(
        model_dir=tmp_path.resolve(), index_dir=tmp_path / "i", device="cpu", precision="fp32", api_token="t", max_images=3,
        max_pixels=1_000_000, max_body_mb=5, threads=2, workers=4, max_batch=16, max_latency_ms=500,
        max_inflight_images=7, max_queue_ms=0, body_timeout_s=9, inline_pixels=0, pad_batches=1, decode="encoder",
        encoder="process", access_log=1)


@pytest.mark.parametrize("name, value, message", [
    ("BARLOW_DEVICE", "gpu", "BARLOW_DEVICE must be one of"),
    ("BARLOW_PRECISION", "half", "BARLOW_PRECISION must be one of auto, fp32, fp16"),
    ("BARLOW_MAX_PIXELS", "lots", "BARLOW_MAX_PIXELS must be an integer"),
    ("BARLOW_MAX_IMAGES", "0", "BARLOW_MAX_IMAGES must be at least 1"),
    ("BARLOW_THREADS", "-1", "BARLOW_THREADS must be at least 0"),
    ("BARLOW_ENCODER", "gpu", "BARLOW_ENCODER must be one of auto, worker, process"),
])
def test_bad_values_are_one_sentence(clean_env, name, value, message):
    clean_env.setenv(name, value)
    with pytest.raises(UserError, match=message):
        settings_from_env()


def test_no_barlow_variable_is_read_outside_the_settings():
    """Serving reads its environment in serving/settings.py only (test_every_variable_is_read covers those);
    the pipeline reads only BARLOW_FASHION_MNIST_DIR (where the data set lives), in one place."""
    read = re.compile(r"(?:environ\.get|getenv|env_int|env_choice)\(\s*f?[\"'](BARLOW_\w*)|environ\[[\"'](BARLOW_\w+)[\"']\](?!\s*=)")
    readers = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")) + sorted((REPO / "serving").glob("*.py")):
        for match in read.finditer(path.read_text()):
            readers.setdefault(match.group(1) or match.group(2), set()).add(str(path.relative_to(REPO)))
    assert readers == {"BARLOW_MODEL_DIR": {"serving/settings.py"}, "BARLOW_DEVICE": {"serving/settings.py"},
                       "BARLOW_PRECISION": {"serving/settings.py"}, "BARLOW_DECODE": {"serving/settings.py"},
                       "BARLOW_ENCODER": {"serving/settings.py"},
                       "BARLOW_INDEX_DIR": {"serving/settings.py"}, "BARLOW_API_TOKEN": {"serving/settings.py"},
                       "BARLOW_": {"serving/settings.py"},  # the f-string of the integer settings
                       "BARLOW_FASHION_MNIST_DIR": {"pipeline/data/fashion_mnist.py"}}, readers


def test_the_encoder_runs_in_the_worker_on_a_cpu_and_in_its_own_process_on_a_gpu(monkeypatch):
    """auto: the CPU's cores are shared by the model and the HTTP path, so no hop; a GPU is fed by several
    workers through one process. Threads and workers follow the place."""
    import pipeline.devices
    from pipeline.runtime import usable_cpus

    monkeypatch.setattr(pipeline.devices, "gpu_available", lambda: False)
    cpu = Settings()
    assert cpu.encoder_place() == "worker" and cpu.http_workers() == 1
    assert cpu.session_threads() == 1 and cpu.sessions_per_worker() == usable_cpus()  # one thread per CPU
    assert Settings(workers=2).sessions_per_worker() == max(1, usable_cpus() // 2)
    assert Settings(threads=3).session_threads() == 3 and Settings(threads=usable_cpus() + 1).sessions_per_worker() == 1
    assert Settings(device="cuda").encoder_place() == "process"  # taken at its word; the encoder checks it
    monkeypatch.setattr(pipeline.devices, "gpu_available", lambda: True)
    gpu = Settings()
    assert gpu.encoder_place() == "process" and gpu.http_workers() == max(1, usable_cpus() - 1)
    assert gpu.session_threads() == 0 and gpu.sessions_per_worker() == 1  # 0: OnnxModel's default, every CPU
    assert Settings(device="cpu").encoder_place() == "worker" and Settings(encoder="process").encoder_place() == "process"
