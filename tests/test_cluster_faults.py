"""The training Job's two pods as two torchrun agents on this host (tests/helpers_cluster.py: the rendered
launch line, `barlow-torchrun --nnodes=2`, c10d rendezvous at pod 0; a small controller applying the
Job's podFailurePolicy and backoffLimitPerIndex), with the faults a cluster does. Each run must end on
the uninterrupted run's weights bit for bit, lose no step beyond the last checkpoint, and leave no
failure counted against backoffLimitPerIndex. bench/cluster_faults.py repeats them for the record.

- kill -9 of pod 1's worker: both agents restart the group (a new rendezvous round) and resume from
  checkpoints/last.pt; no pod fails.
- SIGTERM to pod 1's agent (a preemption): its worker writes the stop checkpoint, the agent exits 143
  (ignored: DisruptionTarget), the replacement joins pod 0's surviving agent in a new round.
- SIGTERM to pod 0's agent, the rendezvous store's host: pod 1's agent loses the store and exits 75
  (ignored by its own rule); both are replaced and start a new store. Also with pod 0's replacement at
  another address.
- pod 1 started long before pod 0 (longer than torch's default 60 s read_timeout): it waits for the
  store instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_cluster import make_config, reference_run, run_scenario
from pipeline.train.launch import STORE_UNREACHABLE

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds workers through /proc (Linux)")]

SIGTERM_EXIT = 143


@pytest.fixture(scope="module")
def cluster_config(fashion_mnist, tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="module")
def reference(cluster_config) -> Path:
    run_dir, _ = reference_run(cluster_config.parent, cluster_config)
    return run_dir


def check(result: dict, checkpoint_every: int = 4) -> None:
    assert result["recovered"], result
    assert result["bit_identical"], result
    assert 0 <= result.get("steps_lost", 0) < checkpoint_every, result
    failed = [p for p in result["pods"] if p["exit_code"] != 0]
    assert all(p["verdict"] == "Ignore" for p in failed), result
    assert not any(result["counted_failures"].values()), result


def test_killed_worker_on_pod_1_restarts_both_agents_and_ends_bit_identical(cluster_config, reference):
    result = run_scenario("c", cluster_config.parent, cluster_config, reference, timeout=200)
    check(result)
    assert result["exit_codes"] == {"0": [0], "1": [0]}, result  # torchrun restarted the group, no pod failed


def test_preempted_pod_1_is_replaced_and_the_run_ends_bit_identical(cluster_config, reference):
    result = run_scenario("b", cluster_config.parent, cluster_config, reference, timeout=200)
    check(result)
    assert result["exit_codes"] == {"0": [0], "1": [SIGTERM_EXIT, 0]}, result
    assert result["steps_lost"] == 0, result  # the SIGTERM checkpoint holds the step the group reached


@pytest.mark.parametrize("kind", ["a", "e"], ids=["same-address", "new-address"])
def test_preempted_store_host_is_replaced_and_no_failure_counts(kind, cluster_config, reference):
    result = run_scenario(kind, cluster_config.parent, cluster_config, reference, name=f"store-host-{kind}",
                          timeout=200)
    check(result)
    assert result["exit_codes"] == {"0": [SIGTERM_EXIT, 0], "1": [STORE_UNREACHABLE, 0]}, result
    assert result["steps_lost"] == 0, result


def test_pod_1_started_before_the_store_waits_for_it(cluster_config, reference):
    result = run_scenario("d", cluster_config.parent, cluster_config, reference, early=65, timeout=200)
    check(result)
    assert result["pod1_alive_when_pod0_started"], result  # torch's default read_timeout (60 s) had ended it
    assert result["exit_codes"] == {"0": [0], "1": [0]}, result
