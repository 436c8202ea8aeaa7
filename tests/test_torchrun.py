"""The training Job's own launch line, run locally: `torchrun --nnodes=1 --nproc-per-node=2` on CPU
(gloo) with the `tiny` recipe, as k8s/overlays/cpu renders it (only N, G, the rendezvous host, the
paths and the metrics port are replaced, as the kubelet's $(VAR) expansion would).

- Two processes finish, rank 0 writes the one checkpoint (holding both ranks' RNG states), and the
  loss curve matches a one-process run with the same global batch. The ranks draw different samples,
  so the curves agree only up to sampling noise: stated tolerance, block means of 8 steps within 20 %
  of the first block's loss, and both runs must learn (last block at most 75 % of the first). The
  learning rate is raised (lr_weights 5) so that 24 steps show a clear descent.
- Killing one worker mid-run: torchrun restarts the group (--max-restarts), training resumes from
  checkpoints/last.pt, and the finished curve equals the uninterrupted two-process run step by step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers_tools import venv_tool

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
BLOCK = 8
# The tiny preset's learning rate barely moves the loss in 24 steps; raise it so the curve says something.
OVERRIDES = ["optim.lr_weights=5", "optim.lr_biases=0.12", "optim.warmup_epochs=0.05"]
RUN_TIMEOUT = 600

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_line() -> tuple[list[str], dict[str, str]]:
    """The training container's command and literal env, from `kubectl kustomize k8s/overlays/cpu`."""
    kubectl = venv_tool("kubectl")
    if not kubectl:
        pytest.fail("kubectl is not installed (pip install -e '.[dev]' provides it): it renders the training Job "
                    "whose launch line this test runs")
    rendered = subprocess.run([kubectl, "kustomize", str(REPO / "k8s/overlays/cpu")], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    job = next(o for o in yaml.safe_load_all(rendered) if o and o["kind"] == "Job" and o["metadata"]["name"] == "barlow-train")
    train = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "train")
    return train["command"], {e["name"]: e["value"] for e in train["env"] if "value" in e}


def local_command(nproc: int, run_dir: Path, config: Path) -> tuple[list[str], dict[str, str]]:
    """The launch line for this machine: N=1, G=nproc, rendezvous on localhost, temp paths."""
    command, env = launch_line()
    env.update(NNODES="1", NPROC_PER_NODE=str(nproc), RUN_DIR=str(run_dir))
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], token) for token in command]
    replace = {"--rdzv-endpoint": f"localhost:{free_port()}", "--config": str(config),
               "--metrics-port": str(free_port()), "--rdzv-id": f"test-{run_dir.name}"}
    local = []
    for token in expanded:
        name = token.split("=", 1)[0]
        local.append(f"{name}={replace[name]}" if name in replace and "=" in token else token)
    assert sum(t.startswith(tuple(replace)) for t in local) == len(replace), f"launch line changed: {command}"
    process_env = {**os.environ, **env, "OMP_NUM_THREADS": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return local + [f"--steps={STEPS}", *OVERRIDES], process_env


@pytest.fixture(scope="module")
def tiny_config(fashion_mnist, tmp_path_factory) -> Path:
    """The `tiny` preset as a `--config` file (what the ConfigMap holds), over 512 Fashion-MNIST images."""
    from pipeline.config import Config, apply, save_yaml
    from pipeline.data.shards import write_shards
    from pipeline.train.presets import PRESETS

    root = tmp_path_factory.mktemp("torchrun")
    write_shards("fashion-mnist:test", root / "shards", per_shard=64, limit=512)
    config = apply(Config(), PRESETS["tiny"])
    config.data.urls = str(root / "shards")
    save_yaml(config, root / "train.yaml")
    return root / "train.yaml"


def run_training(nproc: int, run_dir: Path, config: Path) -> subprocess.CompletedProcess:
    command, env = local_command(nproc, run_dir, config)
    return subprocess.run(command, env=env, cwd=run_dir.parent, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, STEPS + 1)), f"every step logged once, in order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def block_means(curve: dict[int, float]) -> list[float]:
    values = [curve[s] for s in sorted(curve)]
    return [statistics.fmean(values[i:i + BLOCK]) for i in range(0, len(values), BLOCK)]


@pytest.fixture(scope="module")
def one_process(tiny_config) -> Path:
    run_dir = tiny_config.parent / "one-process"
    result = run_training(1, run_dir, tiny_config)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def two_processes(tiny_config) -> Path:
    run_dir = tiny_config.parent / "two-processes"
    result = run_training(2, run_dir, tiny_config)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_two_processes_finish_with_one_rank0_checkpoint_and_the_one_process_curve(two_processes, one_process):
    from pipeline.train.checkpoint import TRAINING_FORMAT, safe_load

    assert [p.name for p in (two_processes / "checkpoints").iterdir()] == ["last.pt"], "one file, no per-rank copies"
    state = safe_load(two_processes / "checkpoints" / "last.pt", TRAINING_FORMAT)
    assert state["step"] == STEPS
    assert len(state["rng"]) == 2, "rank 0 gathered both ranks' RNG states into its one checkpoint"
    assert state["config"]["optim"]["batch_size"] == 16  # the global batch: 8 per rank here
    assert (two_processes / "encoder.pt").is_file()

    two, one = block_means(losses(two_processes)), block_means(losses(one_process))
    tolerance = 0.2 * one[0]
    assert all(abs(a - b) <= tolerance for a, b in zip(two, one)), f"2 processes {two} vs 1 process {one} (+-{tolerance:.1f})"
    assert two[-1] <= 0.75 * two[0] and one[-1] <= 0.75 * one[0], f"the loss must fall: {two}, {one}"


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def local_rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"LOCAL_RANK=")), None)


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (ValueError, KeyError):
        return 0  # a line being written


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc (Linux)")
def test_killed_worker_restarts_the_group_and_resumes_from_the_checkpoint(tiny_config, two_processes):
    from pipeline.config import Config, load_yaml

    every = Config.from_dict(load_yaml(tiny_config)).train.checkpoint_every
    run_dir = tiny_config.parent / "killed"
    command, env = local_command(2, run_dir, tiny_config)
    log = tiny_config.parent / "killed.log"
    with log.open("w") as output:
        torchrun = subprocess.Popen(command, env=env, cwd=run_dir.parent, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not ((run_dir / "checkpoints/last.pt").exists() and last_logged_step(run_dir) > every):
                assert torchrun.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.2)
            victim = next(pid for pid in children(torchrun.pid) if local_rank_of(pid) == "1")
            killed_at = last_logged_step(run_dir)
            os.kill(victim, signal.SIGKILL)
            try:
                returncode = torchrun.wait(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"torchrun did not finish {RUN_TIMEOUT} s after the kill:\n{log.read_text()[-3000:]}")
        finally:
            if torchrun.poll() is None:
                torchrun.send_signal(signal.SIGTERM)
                torchrun.wait(timeout=60)
    output = log.read_text()
    assert returncode == 0, output[-3000:]
    assert re.search(rf"failed \(exitcode: -9\) local_rank: 1 \(pid: {victim}\)", output), "torchrun saw the kill"
    # One restart is enough: a restarted group must not read the dead group's addresses from the agent's
    # store (each failed attempt would burn one of --max-restarts).
    assert len(re.findall(r"failed \(exitcode: ", output)) == 1, output[-3000:]
    resumed = [int(s) for s in re.findall(r"resuming \S+ at step (\d+) of", output)]
    assert resumed and set(resumed) == {resumed[0]}, output[-3000:]  # every rank of the new group resumed
    assert 0 < resumed[0] <= killed_at and resumed[0] % every == 0, (resumed, killed_at)

    # Exact resume: the curve equals the uninterrupted two-process run at every step, and the steps
    # after the kill were redone, not skipped or logged twice.
    killed, clean = losses(run_dir), losses(two_processes)
    for step in range(1, STEPS + 1):
        assert killed[step] == pytest.approx(clean[step], rel=1e-4), f"step {step}"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the run's progress like the kill test")
def test_sigterm_to_torchrun_checkpoints_the_current_step_and_the_run_resumes_exactly(tiny_config, two_processes):
    """A preempted pod: the kubelet's SIGTERM reaches torchrun, which signals each worker's whole process
    group, DataLoader workers included. The trainer must still write its stop checkpoint at the step it
    reached (not fall back to the last periodic one), and a re-run finishes on the uninterrupted curve."""
    from pipeline.train.checkpoint import TRAINING_FORMAT, safe_load

    run_dir = tiny_config.parent / "sigterm"
    command, env = local_command(2, run_dir, tiny_config)
    assert "data.workers=0" not in command  # the preset's DataLoader worker is what torchrun's signal used to kill
    command += ["train.checkpoint_every=1000"]  # no periodic checkpoint to fall back to
    log = tiny_config.parent / "sigterm.log"
    with log.open("w") as output:
        torchrun = subprocess.Popen(command, env=env, cwd=run_dir.parent, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while last_logged_step(run_dir) < 5:
                assert torchrun.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no progress in time"
                time.sleep(0.1)
            signalled_at = last_logged_step(run_dir)
            torchrun.send_signal(signal.SIGTERM)
            torchrun.wait(timeout=120)
        finally:
            if torchrun.poll() is None:
                torchrun.kill()
                torchrun.wait()
    text = log.read_text()
    assert "killed by signal" not in text, text[-3000:]
    assert "checkpointing and stopping" in text, text[-3000:]
    # The agent's own exit code, what the Job's podFailurePolicy sees (torchrun alone exits 1).
    assert torchrun.returncode == 128 + signal.SIGTERM, (torchrun.returncode, text[-3000:])
    stopped_at = safe_load(run_dir / "checkpoints/last.pt", TRAINING_FORMAT)["step"]
    assert signalled_at <= stopped_at == last_logged_step(run_dir) < STEPS, (signalled_at, stopped_at)

    resumed = subprocess.run(command, env=env, cwd=run_dir.parent, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0 and f"at step {stopped_at} of" in resumed.stderr, resumed.stderr[-3000:]
    interrupted, clean = losses(run_dir), losses(two_processes)
    for step in range(1, STEPS + 1):
        assert interrupted[step] == pytest.approx(clean[step], rel=1e-4), f"step {step}"
