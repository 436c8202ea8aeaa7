"""The training Job's two pods as two torchrun agents on this host (tests/helpers_cluster.py: the rendered
launch line, --nnodes=2, c10d rendezvous at pod 0; a small controller applying the Job's podFailurePolicy
and backoffLimitPerIndex), with the faults a cluster does. bench/cluster_faults.py repeats them and also
runs SIGTERM to pod 0, the rendezvous host, whose surviving pod-1 agent fails with
RendezvousConnectionError (a counted failure): not asserted here.

- kill -9 of pod 1's worker: both agents restart the group (a new rendezvous round), training resumes
  from checkpoints/last.pt and ends on the uninterrupted run's weights bit for bit; no pod fails.
- SIGTERM to pod 1's agent (a preemption): its worker writes the stop checkpoint, the agent exits (1,
  ignored by the DisruptionTarget rule), the replacement pod joins pod 0's surviving agent in a new
  round, and the run ends on the same weights; no failure counts against backoffLimitPerIndex.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_cluster import make_config, reference_run, run_scenario

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds workers through /proc (Linux)")]


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
    assert 0 <= result["steps_lost"] < checkpoint_every, result
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
    assert result["exit_codes"] == {"0": [0], "1": [1, 0]}, result  # torchrun exits 1 on SIGTERM
    assert result["steps_lost"] == 0, result  # the SIGTERM checkpoint holds the step the group reached
