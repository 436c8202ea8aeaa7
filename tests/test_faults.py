"""Faults on real `barlow train` / `barlow embed` processes (tests/helpers_faults.py injects them).

kill -9 at seeded random moments (then resume: bit-identical weights, every metrics step once), a
checkpoint save killed halfway or refused by a file-size limit (previous last.pt kept and resumed
from), shards deleted or truncated mid-epoch (skipped and logged, not fatal), and batch embedding
killed at start, at random and inside a part's write (a rerun has every key exactly once).
bench/faults.py runs the same scenarios with more repetitions. Set BARLOW_FAULT_SEED to draw other kill times.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.data.shards import write_shards

from helpers_faults import (checkpoint_file_size_limit, checkpoint_kill_during_save, embed_random_kills, reference_run,
                            shard_faults_mid_epoch, train_random_kills)

SEED = int(os.environ.get("BARLOW_FAULT_SEED", "8"))
STEPS, CHECKPOINT_EVERY = 8, 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(fashion_mnist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault-shards")
    write_shards("fashion-mnist:test", out, per_shard=48, limit=200)  # 5 shards, 12 steps of 16 per epoch
    return out


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal, bit for bit."""
    return reference_run(shards, tmp_path_factory.mktemp("fault-reference") / "run", STEPS, CHECKPOINT_EVERY)


def test_training_killed_at_random_moments_resumes_bit_identical(reference, tmp_path):
    result = train_random_kills(reference, tmp_path / "run", kills=3, seed=SEED)
    assert result["injected"] == 3, f"seed {SEED}: only {result['injected']} kills landed: {result['kills']}"
    assert result["bit_identical"] and result["metrics_steps_once"]


def test_checkpoint_save_killed_halfway_keeps_the_previous_one(reference, tmp_path):
    result = checkpoint_kill_during_save(reference, tmp_path / "run", CHECKPOINT_EVERY)
    assert result["previous_checkpoint_step"] == CHECKPOINT_EVERY and result["bit_identical"]
    assert 0 < result["torn_temp_bytes"] < result["checkpoint_bytes"]


def test_checkpoint_save_refused_by_file_size_limit_is_one_sentence_and_resumable(reference, tmp_path):
    result = checkpoint_file_size_limit(reference, tmp_path / "run")
    assert "File too large" in result["message"] and "last.pt" in result["message"]
    assert result["previous_checkpoint_step"] >= CHECKPOINT_EVERY and result["bit_identical"]


def test_shards_deleted_or_truncated_mid_epoch_are_skipped_and_logged(fashion_mnist, tmp_path):
    data = tmp_path / "shards"
    write_shards("fashion-mnist:test", data, per_shard=16, limit=96)  # 6 shards of one batch each
    result = shard_faults_mid_epoch(data, tmp_path / "run", steps=12, vanish=["shard-000001.tar", "shard-000004.tar"],
                                    truncate=["shard-000002.tar", "shard-000003.tar"])
    assert result["unreadable_logged"] >= 2 and result["read_after_fault"]["vanished"]


def test_embed_killed_at_start_at_random_and_in_a_part_write_then_rerun_has_every_key_once(
        fashion_mnist, tmp_path_factory, tmp_path):
    from helpers_embed import shared_model

    data = tmp_path / "shards"
    write_shards("fashion-mnist:test", data, per_shard=16, limit=160)  # 10 shards -> 10 parts
    result = embed_random_kills(shared_model(tmp_path_factory), data, tmp_path, kills=3, seed=SEED)
    assert result["injected"] >= 2, f"seed {SEED}: {result['kills']}"  # the start kill and the in-write kill always land
    assert result["kills_in_part_write"] >= 1 and result["keys"] == 160
