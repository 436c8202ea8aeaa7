"""Serving pieces that need no server: batch buckets (serving/batching.py), the admission limit
(serving/limits.py) and the launcher's refusal of a missing MODEL_DIR (pipeline/serve.py).
The same pieces at work in a real `bentoml serve`: tests/test_service.py, tests/test_reliability.py (slow).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.serve import start_server
from serving.batching import bucket_for, bucket_sizes, pad_rows
from serving.limits import Admission, Unavailable


def test_batches_pad_to_the_next_bucket_shape():
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64) and bucket_sizes(24) == (1, 2, 4, 8, 16, 24)
    assert [bucket_for(n, bucket_sizes(24)) for n in (1, 3, 9, 17, 24, 30)] == [1, 4, 16, 24, 24, 30]
    images = np.ones((3, 3, 2, 2), dtype=np.uint8)
    padded = pad_rows(images, 4)
    assert padded.shape == (4, 3, 2, 2) and (padded[:3] == 1).all() and (padded[3] == 0).all()


def test_admission_limit_follows_the_measured_speed_toward_the_target_wait():
    admission = Admission(128, target_wait_s=0.5)
    assert admission.limit == 128  # nothing measured yet: the cap
    for _ in range(60):  # 40 images cleared per 0.5 s: 80 images/s -> 40 images wait 0.5 s
        admission.observe(40, 0.5)
    assert admission.limit == 40
    for _ in range(60):  # the machine got busy: 10 images/s
        admission.observe(10, 1.0)
    assert admission.limit == 5
    with admission.admit(5):
        assert admission.full()
        with pytest.raises(Unavailable):
            with admission.admit(1):
                pass
    for _ in range(60):  # a fast device: the cap still holds
        admission.observe(64, 0.01)
    assert admission.limit == 128
    floored = Admission(128, target_wait_s=0.5, min_limit=64)  # the service floors at one full batch
    floored.observe(1, 2.0)  # a cold first request: 0.5 images/s
    assert floored.limit == 64
    fixed = Admission(4, target_wait_s=0)
    fixed.observe(1, 10.0)
    assert fixed.limit == 4


def test_start_server_refuses_a_missing_model_dir(tmp_path):
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    with pytest.raises(UserError, match="not a MODEL_DIR"):  # before any process is started
        start_server(tmp_path / "nothing", env=env, timeout=5)
