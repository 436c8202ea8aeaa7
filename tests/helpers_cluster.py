"""Two torchrun agents on this host, run as the training Job's two pods, and the faults a cluster does to them.

Used by tests/test_cluster_faults.py and bench/cluster_faults.py. Each "pod" is one agent process started
from the launch line `kubectl kustomize k8s/overlays/cpu` renders for the barlow-train Job (`barlow-torchrun
--nnodes=2`, c10d rendezvous at pod 0's endpoint), with only what a pod's network and volumes give
replaced: the rendezvous host becomes 127.0.0.1:<free port> (127.0.0.N:<another port> once pod 0 has
moved), RUN_DIR and --config temp paths, the metrics port a free port per pod. Both pods share RUN_DIR
(the PVC). One thing is added to the launch line: `is_host=1` (pod 0) / `is_host=0` (pod 1) in
--rdzv-conf. In the cluster, torch decides who hosts the rendezvous store by matching the endpoint's name
against the machine (pod 0's IP matches barlow-train-0.barlow-train, pod 1's does not); on one host both
would match 127.0.0.1, and a pod-1 agent started while pod 0 is down would host the store itself, which
no pod 1 in a cluster can do.

`Cluster` is a small Indexed-Job controller: it starts one agent per index, and when an agent exits it
applies the rendered Job's rules: exit 0 completes the index; any other exit goes through
spec.podFailurePolicy (rules in order, onExitCodes / onPodConditions; a pod the harness "disrupted",
i.e. preempted or evicted, carries the DisruptionTarget condition the kubelet/scheduler add), then
backoffLimitPerIndex and maxFailedIndexes; a pod that is not the end of its index is replaced after
`replace_delay` seconds (podReplacementPolicy: Failed, so only once the old one has exited), and, as the
Job's DNS-wait init container makes it, only while a pod 0 runs to resolve to.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers_tools import venv_tool

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
# As tests/test_torchrun.py: a learning rate that moves the tiny preset's loss in 24 steps.
OVERRIDES = ["optim.lr_weights=5", "optim.lr_biases=0.12", "optim.warmup_epochs=0.05", "train.deterministic=true"]
AGENT_EXIT_TIMEOUT = 200  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT is 150 in the Job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendered_job() -> dict:
    """The barlow-train Job from `kubectl kustomize k8s/overlays/cpu`."""
    kubectl = venv_tool("kubectl")
    if not kubectl:
        raise RuntimeError("kubectl is not installed (pip install -e '.[dev]' provides it)")
    rendered = subprocess.run([kubectl, "kustomize", str(REPO / "k8s/overlays/cpu")], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    return next(o for o in yaml.safe_load_all(rendered)
                if o and o["kind"] == "Job" and o["metadata"]["name"] == "barlow-train")


def train_container(job: dict) -> dict:
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "train")


def pod_command(job: dict, index: int, rdzv_endpoint: str, run_dir: Path, config: Path,
                extra: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """Pod `index`'s agent command and environment on this host."""
    container = train_container(job)
    command, env = container["command"], {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env.update(RUN_DIR=str(run_dir))
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], token) for token in command]
    replace = {"--rdzv-endpoint": rdzv_endpoint, "--config": str(config),
               "--metrics-port": str(free_port())}
    local = []
    for token in expanded:
        name, _, value = token.partition("=")
        if name in replace:
            token = f"{name}={replace.pop(name)}"
        elif name == "--rdzv-conf":
            token = f"{token},is_host={int(index == 0)}"
        local.append(token)
    assert not replace, f"launch line changed, {sorted(replace)} missing: {command}"
    assert any(t.startswith("--nnodes=2") for t in local), local
    # What the pod gets from the Job controller and the kubelet (the Indexed Job's index, its hostname).
    pod_env = {"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{job['metadata']['name']}-{index}"}
    process_env = {**os.environ, **env, **pod_env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return local + [f"--steps={STEPS}", *OVERRIDES, *extra], process_env


# --- the Job's failure rules -------------------------------------------------------------------------

def container_exit_code(returncode: int) -> int:
    """What Kubernetes reports as the container's exit code (a signal N reads 128+N)."""
    return 128 - returncode if returncode < 0 else returncode


def pod_failure_verdict(job: dict, exit_code: int, disrupted: bool) -> str:
    """For a failed pod: Ignore, FailJob, FailIndex or Count (the first matching podFailurePolicy rule;
    Count when none matches)."""
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if codes:
            inside = exit_code in codes["values"]
            if inside == (codes["operator"] == "In"):
                return rule["action"]
        for condition in rule.get("onPodConditions", []):
            if condition["type"] == "DisruptionTarget" and condition.get("status", "True") == "True" and disrupted:
                return rule["action"]
    return "Count"


@dataclass
class Pod:
    index: int
    attempt: int
    process: subprocess.Popen
    log: Path
    started: float
    disrupted: bool = False
    exit_code: int | None = None
    ended: float | None = None
    verdict: str | None = None  # Succeeded, Ignore, Count, FailJob, FailIndex

    def record(self) -> dict:
        return {"index": self.index, "attempt": self.attempt, "exit_code": self.exit_code,
                "verdict": self.verdict, "disrupted": self.disrupted,
                "error": last_error(self.log.read_text(errors="replace")) if self.exit_code else None}


def last_error(text: str) -> str | None:
    """The agent's last exception line, e.g. 'torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: ...',
    or barlow-torchrun's line saying why it exits."""
    lines = [line for line in text.splitlines() if re.match(r"^[\w.]*(Error|Exception|Timeout)\w*: ", line)
             or "ChildFailedError" in line or "SignalException" in line or line.startswith("barlow-torchrun: ")]
    return lines[-1][:300] if lines else None


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class StepWatch(threading.Thread):
    """Polls RUN_DIR/metrics.jsonl: the time each distinct line first appeared (a redone step is a new line)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.seen, self.events, self.stopped = path, set(), [], threading.Event()

    def run(self):
        while not self.stopped.is_set():
            self.poll()
            time.sleep(0.05)

    def poll(self):
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            if line not in self.seen:
                try:
                    step = int(json.loads(line)["step"])
                except (ValueError, KeyError):
                    continue  # torn
                self.seen.add(line)
                self.events.append((time.monotonic(), step))

    def last_step(self) -> int:
        return self.events[-1][1] if self.events else 0


class Cluster:
    """The Job's two pods on this host; see the module docstring."""

    def __init__(self, workdir: Path, config: Path, name: str, extra: list[str] = (), replace_delay: float = 2.0,
                 env: dict[str, str] | None = None, move_store: bool = False):
        self.job = rendered_job()
        spec = self.job["spec"]
        self.completions = spec["completions"]
        self.backoff = spec.get("backoffLimitPerIndex", 0)
        self.max_failed = spec.get("maxFailedIndexes", 0)
        self.workdir, self.config, self.name, self.extra = workdir, config, name, list(extra)
        self.run_dir = workdir / name
        # Pod 0's address, what its DNS name resolves to. With move_store, each replacement of pod 0
        # comes up at another one, as a new pod on another node would.
        self.rdzv_endpoint, self.move_store = f"127.0.0.1:{free_port()}", move_store
        self.replace_delay, self.env = replace_delay, env or {}
        self.pods: dict[int, Pod] = {}
        self.history: list[Pod] = []
        self.failures = {i: 0 for i in range(self.completions)}
        self.pending: dict[int, float] = {}  # index -> when its replacement starts
        self.succeeded: set[int] = set()
        self.failed_indexes: set[int] = set()
        self.job_failed: str | None = None
        self.watch = StepWatch(self.run_dir / "metrics.jsonl")
        self.watch.start()

    # pods
    def start(self, index: int) -> Pod:
        attempt = sum(p.index == index for p in self.history)
        if index == 0 and attempt and self.move_store:
            # Another loopback address and port: the store listens on every address, so only a new port
            # makes the old address stop answering, as a vanished pod IP does.
            self.rdzv_endpoint = f"127.0.0.{attempt + 1}:{free_port()}"
        command, env = pod_command(self.job, index, self.rdzv_endpoint, self.run_dir, self.config, self.extra)
        env.update(self.env)
        log = self.workdir / f"{self.name}-pod{index}-{attempt}.log"
        with log.open("w") as output:
            process = subprocess.Popen(command, env=env, cwd=self.workdir, stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        pod = Pod(index, attempt, process, log, time.monotonic())
        self.pods[index] = pod
        self.history.append(pod)
        return pod

    def workers(self, index: int) -> list[int]:
        pod = self.pods.get(index)
        return children(pod.process.pid) if pod and pod.process.poll() is None else []

    def sigterm(self, index: int, disrupted: bool = True) -> None:
        """The kubelet's SIGTERM to pod `index`'s container (torchrun is PID 1 there)."""
        pod = self.pods[index]
        pod.disrupted = disrupted
        pod.process.send_signal(signal.SIGTERM)

    # the controller
    def tick(self) -> None:
        now = time.monotonic()
        for index, pod in list(self.pods.items()):
            if pod.exit_code is not None or pod.process.poll() is None:
                continue
            pod.exit_code, pod.ended = container_exit_code(pod.process.returncode), now
            if pod.exit_code == 0:
                pod.verdict = "Succeeded"
                self.succeeded.add(index)
                continue
            pod.verdict = pod_failure_verdict(self.job, pod.exit_code, pod.disrupted)
            if pod.verdict == "FailJob":
                self.job_failed = f"pod {index} exit {pod.exit_code}: podFailurePolicy FailJob"
            elif pod.verdict == "FailIndex":
                self.failed_indexes.add(index)
            elif pod.verdict == "Count":
                self.failures[index] += 1
                if self.failures[index] > self.backoff:
                    self.failed_indexes.add(index)
            if len(self.failed_indexes) > self.max_failed and not self.job_failed:
                self.job_failed = f"indexes {sorted(self.failed_indexes)} failed (maxFailedIndexes {self.max_failed})"
            if index not in self.failed_indexes and not self.job_failed:
                self.pending[index] = now + self.replace_delay
        for index, when in list(self.pending.items()):
            # The DNS wait (init container): a pod's agent starts once pod 0's name resolves, i.e. while
            # a pod 0 exists (publishNotReadyAddresses publishes it before it is ready).
            resolves = index == 0 or (0 in self.pods and self.pods[0].process.poll() is None)
            if now >= when and resolves and not self.job_failed:
                del self.pending[index]
                self.start(index)

    def done(self) -> bool:
        return bool(self.job_failed) or len(self.succeeded) == self.completions

    def wait_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            if predicate():
                return True
            if self.job_failed:
                return False
            time.sleep(0.1)
        return False

    def close(self) -> None:
        """Stop what still runs (an agent's own process group, workers included)."""
        self.watch.stopped.set()
        for pod in self.history:
            if pod.process.poll() is None:
                for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                    try:
                        os.killpg(pod.process.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        pod.process.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        pass


# --- runs and scenarios ---------------------------------------------------------------------------------

def model_state(run_dir: Path) -> dict:
    from pipeline.train.checkpoint import TRAINING_FORMAT, safe_load

    state = safe_load(run_dir / "checkpoints" / "last.pt", TRAINING_FORMAT)
    return {"step": int(state["step"]), "model": state["model"]}


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def reference_run(workdir: Path, config: Path, timeout: float = 600) -> tuple[Path, dict]:
    """The uninterrupted two-pod run: its RUN_DIR and figures."""
    cluster = Cluster(workdir, config, "reference")
    started = time.monotonic()
    try:
        for index in range(cluster.completions):
            cluster.start(index)
        finished = cluster.wait_until(cluster.done, timeout)
    finally:
        cluster.close()
    result = {"finished": finished and not cluster.job_failed, "seconds": round(time.monotonic() - started, 1),
              "pods": [p.record() for p in cluster.history]}
    assert result["finished"], result
    return cluster.run_dir, result


def wait_for_step(cluster: Cluster, step: int, timeout: float) -> None:
    ok = cluster.wait_until(lambda: cluster.watch.last_step() >= step, timeout)
    assert ok, f"step {step} not reached: {[p.record() for p in cluster.history]}"


def run_scenario(kind: str, workdir: Path, config: Path, reference: Path, name: str | None = None,
                 fault_step: int = 6, timeout: float = 300, early: float = 90, env: dict | None = None) -> dict:
    """One scenario, returns its figures. kind:
    a: SIGTERM to pod 0's agent (a preemption: DisruptionTarget), replaced by the controller;
    b: the same for pod 1;
    c: kill -9 of pod 1's worker process (the agent's child);
    d: pod 1's agent started `early` seconds before pod 0's, no fault;
    e: as a, and pod 0's replacement comes up at another address (a new pod IP on another node).
    """
    cluster = Cluster(workdir, config, name or f"scenario-{kind}", env=env, move_store=kind == "e")
    started = time.monotonic()
    result: dict = {"scenario": kind}
    try:
        if kind == "d":
            cluster.start(1)  # pod 0's name already resolves; its container has not started
            time.sleep(early)  # the controller does not run meanwhile: pod 1 is on its own
            cluster.tick()
            result["pod1_alive_when_pod0_started"] = cluster.pods[1].process.poll() is None
            cluster.start(0)
            fault_at = None
        else:
            cluster.start(0)
            cluster.start(1)
            wait_for_step(cluster, fault_step, timeout)
            old_workers = cluster.workers(0) + cluster.workers(1)
            fault_at = time.monotonic()
            result["step_at_fault"] = cluster.watch.last_step()
            if kind in ("a", "b", "e"):
                cluster.sigterm(1 if kind == "b" else 0)
            elif kind == "c":
                victim = cluster.workers(1)[0]
                os.kill(victim, signal.SIGKILL)
            else:
                raise ValueError(kind)
            # the old group is gone once none of its workers lives; any step logged later is the new group's
            assert cluster.wait_until(lambda: not any(alive(p) for p in old_workers), AGENT_EXIT_TIMEOUT), \
                "the old group's workers did not exit"
            old_events = len(cluster.watch.events)
            cluster.watch.poll()
        finished = cluster.wait_until(cluster.done, timeout)
        result["recovered"] = bool(finished and not cluster.job_failed)
    finally:
        cluster.close()
    result["seconds"] = round(time.monotonic() - started, 1)
    result["job_failed"] = cluster.job_failed
    if fault_at is not None:
        events = cluster.watch.events
        before = [s for t, s in events[:old_events]]
        after = events[old_events:]
        result["last_step_before_restart"] = max(before) if before else 0
        if after:
            result["seconds_fault_to_next_step"] = round(after[0][0] - fault_at, 1)
            result["resumed_from_step"] = after[0][1] - 1
            result["steps_lost"] = result["last_step_before_restart"] - result["resumed_from_step"]
    result["pods"] = [p.record() for p in cluster.history]
    result["exit_codes"] = {str(i): [p.exit_code for p in cluster.history if p.index == i] for i in range(2)}
    result["counted_failures"] = dict(cluster.failures)
    try:
        mine, ref = model_state(cluster.run_dir), model_state(reference)
        result["final_step"] = mine["step"]
        result["bit_identical"] = mine["step"] == ref["step"] and same_weights(mine["model"], ref["model"])
    except (OSError, KeyError, ValueError) as exc:
        result["bit_identical"] = False
        result["weights_error"] = str(exc)[:200]
    return result


def make_config(root: Path) -> Path:
    """The `tiny` preset over 512 Fashion-MNIST test images in 8 shards (tests/test_torchrun.py's tiny_config)."""
    from pipeline.config import Config, apply, save_yaml
    from pipeline.data.shards import write_shards
    from pipeline.train.presets import PRESETS

    write_shards("fashion-mnist:test", root / "shards", per_shard=64, limit=512)
    config = apply(Config(), PRESETS["tiny"])
    config.data.urls = str(root / "shards")
    save_yaml(config, root / "train.yaml")
    return root / "train.yaml"
