"""The GPU suite (issue 15): every open GPU claim from one device call of at most 9 minutes on one H200.

Four stages, each an existing benchmark run as a child process under its own time budget, in this order:
  train    (b) bench/train_throughput.py: ResNet-50, 224 px, bf16, batch 256, 50 steps each of synthetic
               tensors, JPEG shards through CPU views and JPEG shards through GPU views
  embed    (d) bench/embed_throughput.py: `barlow embed` of JPEG shards on the ONNX Runtime CUDA provider,
               against the raw session (ResNet-50, 224 px)
  serve    (c) bench/serve_throughput.py: /embed with 64 clients against the raw session, ResNet-50 at
               224 px on the CUDA provider (the server is started with BARLOW_DEVICE=cuda, so it refuses to
               run on a CPU fallback), the server's provider recorded
  quality  (a) bench/quality.py: the fmnist preset for what is left of the budget less the evaluation's
               reserve, at most 5 minutes of training, then kNN and linear evaluation
Before them, side by side: a check of what is installed (webdataset, bentoml, an onnxruntime whose CUDA
provider loads), a random ResNet-50 exported once for embed and serve, the JPEG shards of train and the
Fashion-MNIST training shards of quality. A stage that lacks what it needs is skipped with the reason; one
that fails or outruns its budget is recorded as failed with the end of its log; the suite goes on.

Every record goes to --results (bench/results), and with the suite's summary (suite-<device>-<date>.json:
device, commit, per stage its status, reason, seconds and records, and the issue's targets: met, not met or
not measured) and a tarball of the logs to --out: at most 8 plain files (the records are bundled in one
tarball when there are more than 6), names of letters, digits, '.', '_' and '-'. That is what comes back
from a device machine's $OUT.

--carried DIR (bench/gpu_suite.sh passes .gpu) first installs what `make gpu-wheels` packed for the device:
wheels into --site with pip (no index), onnxruntime-gpu from its xz pieces, Fashion-MNIST's files; then the
children run with PYTHONPATH=--site. docs/gpu-suite.md has the device calls.

    bash bench/gpu_suite.sh                               # the device: install what was carried, then the suite
    python bench/gpu_suite.py --out /tmp/suite            # a machine with a GPU and every dependency
    python bench/gpu_suite.py --smoke --out /tmp/smoke    # CPU at CI size: records in a temp dir
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import lzma
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
STAGES = ("train", "embed", "serve", "quality")  # the default order: quality last takes what is left
LETTERS = {"quality": "a", "train": "b", "serve": "c", "embed": "d"}  # the names
OUT_FILES = 8  # what comes back from $OUT: at most 8 files, 16 MiB each, plain names
OUT_FILE_BYTES = 16 * 2**20
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_TAIL_BYTES = 2 * 2**20  # of each log, in the logs tarball
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass
class Sizes:
    """What each stage runs: the device's sizes, or CI's (--smoke)."""

    smoke: bool
    device: str  # cuda | cpu: torch's device for train and quality, ONNX Runtime's for embed and serve
    train: list[str]
    train_images: int  # JPEGs for train's shards (it would write as many itself)
    embed: list[str]
    serve: list[str]
    quality: list[str]
    model: tuple[str, int]  # the random model embed and serve share: arch, image size
    fmnist_limit: int | None  # Fashion-MNIST training images in quality's shards (None: all 60,000)
    budgets: dict[str, float]  # seconds each stage may take at most
    prepare_budget: float
    min_stage_s: float  # a stage with less left than this is skipped


def gpu_sizes(cpus: int) -> Sizes:
    workers = max(1, cpus)
    batch, warmup, steps = 256, 3, 50
    return Sizes(
        smoke=False, device="cuda",
        train=["--preset", "imagenet", "--batch", str(batch), "--image-size", "224", "--steps", str(steps),
               "--warmup", str(warmup), "--workers", str(workers), "--device", "cuda"],
        # train_throughput.py's own count: enough for the timed steps and the workers' first batches
        train_images=min(4096, batch * (warmup + steps) + batch * workers),
        embed=["--provider", "cuda", "--images", "10000", "--batch-size", "64", "--raw-seconds", "5",
               "--skip-s3", "--skip-search"],
        serve=["--clients", "64", "--client-processes", "4", "--seconds", "3", "--rounds", "3", "--warmup", "3",
               "--server-env", "BARLOW_DEVICE=cuda"],
        quality=["--preset", "fmnist", "--no-supervised", "--device", "cuda"],
        model=("resnet50", 224), fmnist_limit=None,
        budgets={"train": 160, "embed": 70, "serve": 120, "quality": 5 * 60 + 140},
        prepare_budget=120, min_stage_s=20)


def smoke_sizes() -> Sizes:
    return Sizes(
        smoke=True, device="cpu",
        train=["--preset", "tiny", "--batch", "8", "--steps", "2", "--warmup", "1", "--workers", "1",
               "--device", "cpu"],
        train_images=64,
        embed=["--provider", "cpu", "--images", "48", "--batch-size", "16", "--workers", "1", "--raw-seconds",
               "0.5", "--photo-size", "64", "48", "--skip-s3", "--skip-search"],
        serve=["--clients", "2", "--seconds", "1", "--rounds", "1", "--warmup", "0.5",
               "--server-env", "BARLOW_DEVICE=cpu"],
        # resnet10: a third of resnet18's export time, the same code path
        quality=["--preset", "tiny", "--steps", "2", "--limit-train", "200", "--limit-test", "100",
                 "--no-supervised", "--device", "cpu", "model.arch=resnet10"],
        model=("resnet10", 32), fmnist_limit=256,
        budgets={"train": 120, "embed": 120, "serve": 120, "quality": 120},
        prepare_budget=120, min_stage_s=5)


# ------------------------------------------------------------------------------------------ targets

@dataclass
class Target:
    name: str
    stage: str
    path: tuple[str, ...]  # keys into the stage's record ("seconds": the stage's own wall time)
    op: str  # >= or <=
    threshold: float
    unit: str = ""


TARGETS = (  # issue 15, item 4: one H200, ResNet-50, 224 px, bf16
    Target("synthetic pairs/s", "train", ("synthetic", "pairs_per_s"), ">=", 2600),
    Target("GPU views pairs/s", "train", ("gpu_views", "pairs_per_s"), ">=", 2500),
    Target("GPU views / synthetic", "train", ("gpu_views_over_synthetic",), ">=", 0.95),
    Target("GPU views data wait fraction", "train", ("gpu_views", "data_wait_fraction"), "<=", 0.05),
    Target("fmnist kNN top-1", "quality", ("knn",), ">=", 0.905),
    Target("fmnist linear top-1", "quality", ("linear",), ">=", 0.920),
    Target("fmnist minutes in total", "quality", ("minutes",), "<=", 10),
    Target("/embed served / raw", "serve", ("served_over_raw",), ">=", 0.8),
    Target("/embed images/s", "serve", ("served_images_per_s",), ">=", 2000),
    Target("barlow embed / raw", "embed", ("ratio",), ">=", 0.9),
)


def record_provider(stage: str, record: dict) -> str | None:
    """The ONNX Runtime provider a serve or embed record ran on (the server's own report for serve)."""
    if stage == "serve":
        return record.get("provider")
    if stage == "embed":
        return (record.get("config", {}).get("providers") or [None])[0]
    return None


def compare_targets(stages: dict[str, dict], records: dict[str, dict], asked_provider: str) -> list[dict]:
    """Each target: its value from the stage's record, and met / not met / not measured with the reason."""
    rows = []
    for target in TARGETS:
        row = {"target": target.name, "stage": target.stage, "letter": LETTERS[target.stage],
               "op": target.op, "threshold": target.threshold, "value": None}
        stage = stages.get(target.stage, {})
        record = records.get(target.stage)
        provider = record_provider(target.stage, record) if record else None
        if record is None:
            status = stage.get("status", "not run")
            reason = f"stage {target.stage} {status}" + (f": {stage['reason']}" if stage.get("reason") else "")
            row.update(status="not measured",
                       reason=reason if status != "ran" else f"stage {target.stage} wrote no record")
        elif provider is not None and provider != asked_provider:
            row.update(status="not measured", reason=f"ran on {provider}, not {asked_provider}")
        else:
            value = ({"minutes": round(stage.get("seconds", 0) / 60, 2)} if target.path == ("minutes",)
                     else record)
            for key in target.path:
                value = value.get(key) if isinstance(value, dict) else None
            if not isinstance(value, (int, float)):
                row.update(status="not measured", reason=f"the record has no {'.'.join(target.path)}")
            else:
                met = value >= target.threshold if target.op == ">=" else value <= target.threshold
                row.update(value=value, status="met" if met else "not met", reason="")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ child processes

def child_env(extra_path: list[str]) -> dict[str, str]:
    """Ours, with the repository (and --site) on PYTHONPATH: DataLoader workers and servers import from it."""
    env = dict(os.environ)
    paths = [*extra_path, str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    return env


def descendants(pid: int) -> set:
    try:
        import psutil

        return set(psutil.Process(pid).children(recursive=True))
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        return set()


def stop_all(process: subprocess.Popen, seen: set) -> None:
    """SIGTERM the child's process group and every descendant seen (a server in its own session too),
    then SIGKILL what is left after 10 s."""
    import contextlib

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    for proc in seen:
        with contextlib.suppress(Exception):
            proc.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for proc in seen:
        with contextlib.suppress(Exception):
            if proc.is_running():
                proc.kill()
    process.wait()


class Child:
    """A child process with its output in a log file, stopped with everything it started at its deadline."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str], cwd: Path):
        self.name, self.command, self.log = name, command, log
        self.started = time.monotonic()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as output:
            output.write(f"$ {' '.join(command)}\n".encode())
            output.flush()
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                            start_new_session=True)
        self.seen: set = set()
        self.timed_out = False
        self.seconds = 0.0

    def poll(self) -> int | None:
        self.seen |= descendants(self.process.pid)
        return self.process.poll()

    def wait(self, deadline: float) -> int:
        while self.poll() is None:
            if time.monotonic() >= deadline:
                self.timed_out = True
                stop_all(self.process, self.seen)
                break
            time.sleep(0.5)
        for proc in self.seen:  # whatever it left behind: a server in its own session, a worker
            try:
                if proc.is_running():
                    stop_all(self.process, self.seen)
                    break
            except Exception:  # noqa: BLE001
                pass
        self.seconds = time.monotonic() - self.started
        return self.process.returncode

    def tail(self, chars: int = 1500) -> str:
        try:
            text = self.log.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""
        return text


def failure_reason(child: Child, budget: float) -> str:
    if child.timed_out:
        return f"stopped at its budget of {budget:.0f} s"
    lines = [line for line in child.tail(6000).splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"Error|error:|Exception|cannot start|Traceback", line)]
    last = errors[-1] if errors else (lines[-1] if lines else "")
    return f"exit code {child.process.returncode}: {last.strip()[:400]}"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.json")}


# ------------------------------------------------------------------------------------------ jobs (children)

def job_probe(out: Path, want_cuda: bool) -> None:
    """What is installed here and whether ONNX Runtime's CUDA provider really loads: JSON to `out`."""
    import importlib
    from importlib import metadata

    info: dict = {"python": platform.python_version(), "cpus": os.cpu_count()}

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        import torch  # first: onnxruntime-gpu loads the CUDA and cuDNN libraries torch's wheels carry

        info.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                    gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        from common import device_label

        info["device"] = device_label(info["cuda"])
    except Exception as exc:  # noqa: BLE001
        info.update(torch=None, cuda=False, device=f"cpu-{os.cpu_count()}core", torch_error=repr(exc)[:300])
    for module in ("webdataset", "bentoml", "onnx", "onnxscript", "skimage"):
        try:
            imported = importlib.import_module(module)
            info[module] = {"ok": True, "version": getattr(imported, "__version__", None),
                            "file": str(getattr(imported, "__file__", ""))}
        except Exception as exc:  # noqa: BLE001
            info[module] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    ort_info: dict = {"distributions": {d: version(d) for d in ("onnxruntime", "onnxruntime-gpu")}}
    try:
        import onnxruntime as ort

        ort_info.update(ok=True, version=ort.__version__, file=ort.__file__,
                        available=ort.get_available_providers())
        if want_cuda:
            ort_info["cuda_session"] = cuda_session_check(ort)
    except Exception as exc:  # noqa: BLE001
        ort_info.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    info["onnxruntime"] = ort_info
    out.write_text(json.dumps(info, indent=1))


def cuda_session_check(ort) -> dict:
    """A one-node graph on the CUDA provider: which provider the session really runs (ORT falls back to
    the CPU with only a log line when the CUDA provider cannot load)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"ok": False, "provider": None,
                "error": f"onnxruntime {ort.__version__} has no CUDA provider (a CPU build)"}
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 9)
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        y = session.run(None, {"x": np.arange(4, dtype=np.float32)})[0]
        provider = session.get_providers()[0]
        ok = provider == "CUDAExecutionProvider" and y.tolist() == [0.0, 2.0, 4.0, 6.0]
        return {"ok": ok, "provider": provider, "onnx": onnx.__version__,
                **({} if ok else {"error": f"the session runs {provider}: the CUDA provider did not load "
                                           "(its log line is in prepare-probe.log)"})}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "provider": None, "error": f"{type(exc).__name__}: {exc}"[:400]}


def job_model(out: Path, arch: str, image_size: int) -> None:
    from common import random_model

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    random_model(out, arch, image_size)


def job_jpeg_shards(out: Path, count: int) -> None:
    """train_throughput.py's own shards (the same function, the same count), written ahead."""
    from train_throughput import write_jpeg_shards

    write_jpeg_shards(out, count=count)


def job_fmnist_shards(out: Path, limit: int | None) -> None:
    """quality.py's training shards (WORK/shards-train), written ahead."""
    from pipeline.data.shards import write_shards

    write_shards("fashion-mnist:train", out, overwrite=True, limit=limit)


# ------------------------------------------------------------------------------------------ carried packages

class Pieces(io.RawIOBase):
    """The concatenation of several files, read once front to back (the pieces of one xz stream)."""

    def __init__(self, paths: list[Path]):
        self.paths, self.file = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.file is None:
                if not self.paths:
                    return 0
                self.file = open(self.paths.pop(0), "rb")
            count = self.file.readinto(buffer)
            if count:
                return count
            self.file.close()
            self.file = None


def install_carried(carried: Path, site: Path, log: Path) -> dict:
    """Install what `make gpu-wheels` packed (bench/gpu_wheels.py): the wheels in base/wheels with pip (no
    index, no dependency resolution) and onnxruntime-gpu's site tree from its xz pieces, into `site`; its
    `env` points BARLOW_FASHION_MNIST_DIR at base/fashion-mnist. What is missing is reported, never fatal:
    the stages that need it are skipped."""
    started = time.monotonic()
    result: dict = {"carried": str(carried), "site": str(site)}
    manifest_path = carried / "base" / "manifest.json"
    if not manifest_path.is_file():
        result["error"] = f"{manifest_path} is missing: nothing carried (make gpu-wheels, docs/gpu-suite.md)"
        return result
    manifest = json.loads(manifest_path.read_text())
    result["manifest"] = {"created": manifest.get("created"), "commit": manifest.get("commit"),
                          "python": manifest.get("python"),
                          "onnxruntime_gpu": manifest.get("onnxruntime_gpu", {}).get("version")}
    site.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        wheels = sorted((carried / "base" / "wheels").glob("*.whl"))
        if wheels:
            command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site),
                       *map(str, wheels)]
            output.write(f"$ {' '.join(command[:12])} ... ({len(wheels)} wheels)\n".encode())
            output.flush()
            code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode
            result["wheels"] = {"count": len(wheels), "ok": code == 0}
        pieces = manifest.get("onnxruntime_gpu", {}).get("pieces", [])
        missing = [p["path"] for p in pieces if not (carried / p["path"]).is_file()
                   or (carried / p["path"]).stat().st_size != p["bytes"]]
        if pieces and not missing:
            from pipeline.runtime import sha256_file  # the repository is on sys.path (bench/common.py)

            bad = [p["path"] for p in pieces if sha256_file(carried / p["path"]) != p["sha256"]]
            if bad:
                result["onnxruntime_gpu"] = {"installed": False, "reason": f"pieces damaged: {', '.join(bad)}"}
            else:
                try:
                    with tarfile.open(fileobj=io.BufferedReader(Pieces([carried / p["path"] for p in pieces]),
                                                                2**20), mode="r|xz") as archive:
                        try:
                            archive.extractall(site, filter="data")  # Python 3.11.4 and later
                        except TypeError:
                            archive.extractall(site)
                    result["onnxruntime_gpu"] = {"installed": True, "version": manifest["onnxruntime_gpu"]["version"]}
                except (OSError, EOFError, tarfile.TarError, lzma.LZMAError) as exc:
                    result["onnxruntime_gpu"] = {"installed": False, "reason": f"{type(exc).__name__}: {exc}"[:300]}
        elif pieces:
            result["onnxruntime_gpu"] = {
                "installed": False, "missing": missing,
                "reason": f"pieces {', '.join(missing)} are not here: carry each in a call right after the "
                          "last (the machine keeps them only while it stays warm, 30 s)"}
        output.write(f"{json.dumps(result)}\n".encode())
    fmnist = carried / "base" / "fashion-mnist"
    env = result["env"] = {}  # for the caller to export: this function leaves os.environ alone
    if (fmnist / "train-images-idx3-ubyte.gz").is_file() and "BARLOW_FASHION_MNIST_DIR" not in os.environ:
        env["BARLOW_FASHION_MNIST_DIR"] = str(fmnist.resolve())
    if manifest.get("commit") and "BARLOW_COMMIT" not in os.environ:
        env["BARLOW_COMMIT"] = manifest["commit"]  # where .git did not travel
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


# ------------------------------------------------------------------------------------------ the suite

@dataclass
class StageResult:
    status: str = "not run"  # ran | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    budget_s: float = 0.0
    records: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    log: str = ""
    details: dict = field(default_factory=dict)  # what the next run's budgets can learn from


class Suite:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, started: float):
        self.args, self.sizes, self.started = args, sizes, started
        self.deadline = started + args.budget_s
        self.work: Path = args.work
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results: Path = args.results
        self.results.mkdir(parents=True, exist_ok=True)
        self.env = child_env([str(args.site)] if args.site else [])
        if sizes.smoke:  # one thread each: it measures nothing, and on a busy 2-core machine OpenMP's
            # threads wait for each other at every small op (a tiny training step took 6 s instead of 0.3)
            self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.stages: dict[str, StageResult] = {}
        self.records: dict[str, dict] = {}
        self.record_paths: dict[str, list[Path]] = {}
        self.prepare: dict = {}
        self.probe: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic() - self.args.finalize_s

    def say(self, text: str) -> None:
        print(f"[suite {time.monotonic() - self.started:6.1f} s] {text}", flush=True)

    def job(self, name: str, *job_args: str) -> Child:
        command = [sys.executable, str(Path(__file__).resolve()), "--job", name, *job_args]
        return Child(f"prepare-{name}", command, self.logs / f"prepare-{name}.log", self.env, self.work)

    # --- preparation, side by side
    def run_prepare(self, stages: list[str]) -> None:
        sizes = self.sizes
        started = time.monotonic()
        children = {"probe": self.job("probe", "--job-out", str(self.work / "probe.json"),
                                      *(["--want-cuda"] if sizes.device == "cuda" else []))}
        if {"embed", "serve"} & set(stages):
            children["model"] = self.job("model", "--job-out", str(self.work / "model"), "--arch", sizes.model[0],
                                         "--image-size", str(sizes.model[1]))
        if "train" in stages:
            children["jpeg-shards"] = self.job("jpeg-shards", "--job-out", str(self.work / "jpeg-shards"),
                                               "--count", str(sizes.train_images))
        if "quality" in stages:
            children["fmnist-shards"] = self.job("fmnist-shards", "--job-out",
                                                 str(self.work / "quality" / "shards-train"),
                                                 *(["--limit", str(sizes.fmnist_limit)] if sizes.fmnist_limit else []))
        deadline = min(time.monotonic() + sizes.prepare_budget, self.deadline - self.args.finalize_s)
        for name, child in children.items():
            code = child.wait(deadline)
            ok = code == 0 and not child.timed_out
            self.prepare[name] = {"ok": ok, "seconds": round(child.seconds, 1), "log": child.log.name,
                                  **({} if ok else {"reason": failure_reason(child, sizes.prepare_budget)})}
        probe_path = self.work / "probe.json"
        self.probe = json.loads(probe_path.read_text()) if probe_path.is_file() else {}
        self.prepare["seconds"] = round(time.monotonic() - started, 1)
        jobs = {name: state for name, state in self.prepare.items() if isinstance(state, dict)}
        self.say(f"prepared in {self.prepare['seconds']} s: "
                 + ", ".join(f"{name} {'ok' if state['ok'] else 'FAILED'}" for name, state in jobs.items()))

    # --- what a stage needs
    def missing(self, stage: str) -> str | None:
        probe, sizes = self.probe, self.sizes
        if not probe:
            return f"the probe of what is installed failed: {self.prepare.get('probe', {}).get('reason', '')}"
        needs = {"train": ["webdataset", "gpu", "jpeg-shards"], "embed": ["webdataset", "runtime", "model"],
                 "serve": ["bentoml", "runtime", "model"], "quality": ["webdataset", "gpu", "fmnist-shards"]}[stage]
        for need in needs:
            if need in ("webdataset", "bentoml") and not probe.get(need, {}).get("ok"):
                return f"{need} is not installed ({probe.get(need, {}).get('error', '')}); carry its wheels " \
                       "(make gpu-wheels, docs/gpu-suite.md)"
            if need == "gpu" and sizes.device == "cuda" and not probe.get("cuda"):
                return "torch sees no CUDA GPU"
            if need == "runtime":
                ort = probe.get("onnxruntime", {})
                if not ort.get("ok"):
                    return f"onnxruntime does not import: {ort.get('error', '')}"
                if sizes.device == "cuda":
                    if not probe.get("cuda"):
                        return "torch sees no CUDA GPU"
                    check = ort.get("cuda_session", {})
                    if not check.get("ok"):
                        dists = ", ".join(f"{k} {v}" for k, v in ort.get("distributions", {}).items() if v)
                        return (f"no ONNX Runtime CUDA provider: {check.get('error', '')} (installed: "
                                f"{dists or 'none'}; carry onnxruntime-gpu, docs/gpu-suite.md)")
            if need in ("model", "jpeg-shards", "fmnist-shards"):
                state = self.prepare.get(need, {})
                if not state.get("ok"):
                    return f"preparing its {need} failed: {state.get('reason', 'not run')}"
        return None

    def command(self, stage: str) -> tuple[list[str], float] | tuple[None, str]:
        """The stage's command line and budget, or (None, why it is skipped)."""
        sizes, out = self.sizes, ["--out", str(self.results)]
        budget = min(sizes.budgets[stage], self.left())
        if budget < sizes.min_stage_s:
            return None, f"{max(self.left(), 0):.0f} s left of the suite's {self.args.budget_s:.0f} s budget"
        python = [sys.executable, str(BENCH / {"train": "train_throughput.py", "embed": "embed_throughput.py",
                                               "serve": "serve_throughput.py", "quality": "quality.py"}[stage])]
        model = ["--model-dir", str(self.work / "model" / "model")]
        if stage == "train":
            return [*python, *sizes.train, "--images", str(sizes.train_images),
                    "--shards", str(self.work / "jpeg-shards"), *out], budget
        if stage == "embed":
            return [*python, *model, *sizes.embed, *out], budget
        if stage == "serve":
            return [*python, *model, *sizes.serve, "--log", str(self.logs / "serve-server.log"), *out], budget
        length = []
        if not sizes.smoke:  # what is left, less the reserve for calibration, export and evaluation; 5 at most
            minutes = min(self.args.quality_minutes, (budget - self.args.quality_reserve_s) / 60)
            if minutes < self.args.quality_min_minutes:
                return None, (f"{budget:.0f} s left: under {self.args.quality_min_minutes} minutes of training after "
                              f"the {self.args.quality_reserve_s:.0f} s reserve for calibration, export and eval")
            length = ["--minutes", f"{minutes:.2f}"]
            self.quality_minutes = round(minutes, 2)
        return [*python, *sizes.quality, *length, "--work", str(self.work / "quality"), *out], budget

    def run_stage(self, stage: str) -> None:
        result = self.stages[stage] = StageResult()
        why = self.missing(stage)
        command, budget = self.command(stage) if why is None else (None, why)
        if command is None:
            result.status, result.reason = "skipped", budget
            self.say(f"{stage} ({LETTERS[stage]}) skipped: {budget}")
            return
        result.command, result.budget_s = [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                                           for c in command], round(budget, 1)
        self.say(f"{stage} ({LETTERS[stage]}) starts, budget {budget:.0f} s")
        before = snapshot(self.results)
        child = Child(stage, command, self.logs / f"{stage}.log", self.env, self.work)
        code = child.wait(time.monotonic() + budget)
        after = snapshot(self.results)
        written = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
        result.seconds, result.returncode, result.log = round(child.seconds, 1), code, child.log.name
        result.records = written
        self.record_paths[stage] = [self.results / name for name in written]
        main = [name for name in written if not name.startswith("search-")]
        if main:
            try:
                self.records[stage] = json.loads((self.results / main[-1]).read_text())
            except (OSError, ValueError):
                pass
        record = self.records.get(stage, {})
        if stage == "quality" and record:
            result.details = {"minutes_asked": getattr(self, "quality_minutes", None),
                              "train_minutes": record.get("train_minutes"),
                              "besides_training_s": round(result.seconds - 60 * (record.get("train_minutes") or 0), 1),
                              "eval_s": record.get("eval", {}).get("seconds")}
        elif stage in ("serve", "embed") and record:
            result.details = {"provider": record_provider(stage, record)}
        if code == 0 and not child.timed_out:
            result.status = "ran"
            if not written:
                result.status, result.reason = "failed", "exit code 0 but no record written"
        else:
            result.status, result.reason = "failed", failure_reason(child, budget)
        self.say(f"{stage} ({LETTERS[stage]}) {result.status} in {result.seconds} s"
                 + (f": {result.reason}" if result.reason else "")
                 + (f"; records {', '.join(written)}" if written else ""))

    # --- the summary and --out
    def summary(self, install: dict | None) -> dict:
        asked = "CUDAExecutionProvider" if self.sizes.device == "cuda" else "CPUExecutionProvider"
        stages = {name: asdict(result) for name, result in self.stages.items()}
        targets = compare_targets(stages, self.records, asked)
        probe = self.probe
        from common import commit

        return {
            "suite": "gpu_suite.py (issue 15)",
            "device": probe.get("device") or f"cpu-{os.cpu_count()}core",
            "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "smoke": self.sizes.smoke,
            "budget_s": self.args.budget_s,
            "seconds": round(time.monotonic() - self.started, 1),
            "stages": {name: {"letter": LETTERS[name], **stages[name]} for name in stages},
            "targets": targets,
            "targets_for": "one NVIDIA H200: ResNet-50, 224 px, bf16 (issue 15 item 4)"
                           + ("; a smoke run on the CPU at CI size measures none of them" if self.sizes.smoke else ""),
            "targets_count": {status: sum(t["status"] == status for t in targets)
                              for status in ("met", "not met", "not measured")},
            "prepare": self.prepare,
            "install": install,
            "environment": {
                "python": probe.get("python", platform.python_version()), "torch": probe.get("torch"),
                "cuda": probe.get("cuda"), "gpus": probe.get("gpus"), "cpus": probe.get("cpus"),
                "onnxruntime": probe.get("onnxruntime"),
                **{name: probe.get(name) for name in ("webdataset", "bentoml", "onnx", "onnxscript", "skimage")},
            },
        }

    def write_out(self, summary_path: Path, out: Path) -> list[str]:
        """The summary, the records (one tarball when more than 6) and the logs' tarball into `out`: at most
        8 plain files, each under 16 MiB, as a device's $OUT brings back."""
        out.mkdir(parents=True, exist_ok=True)
        records = [path for paths in self.record_paths.values() for path in paths if path.is_file()]
        written = []

        def place(path: Path, name: str) -> None:
            name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
            shutil.copyfile(path, out / name)
            written.append(name)

        place(summary_path, summary_path.name)
        if len(records) <= OUT_FILES - 2:
            for path in records:
                place(path, path.name)
        else:
            bundle = self.work / "suite-records.tar.gz"
            with tarfile.open(bundle, "w:gz") as archive:
                for path in records:
                    archive.add(path, arcname=re.sub(r"[^A-Za-z0-9._-]", "_", path.name))
            place(bundle, bundle.name)
        logs = self.work / "suite-logs.tar.gz"
        with tarfile.open(logs, "w:gz") as archive:
            for path in sorted(self.logs.glob("*.log")):
                data = path.read_bytes()[-LOG_TAIL_BYTES:]
                info = tarfile.TarInfo(re.sub(r"[^A-Za-z0-9._-]", "_", path.name))
                info.size, info.mtime = len(data), int(time.time())
                archive.addfile(info, io.BytesIO(data))
        place(logs, logs.name)
        too_big = [name for name in written if (out / name).stat().st_size > OUT_FILE_BYTES]
        if too_big:
            self.say(f"over 16 MiB, will not come back from the device: {', '.join(too_big)}")
        return written


def print_table(summary: dict) -> None:
    print("\nstage       status   seconds  record / reason")
    for name, stage in summary["stages"].items():
        note = ", ".join(stage["records"]) or stage["reason"]
        print(f"{stage['letter']} {name:<9} {stage['status']:<8} {stage['seconds']:>7}  {note[:150]}")
    print("\ntarget                          value       target     status")
    for row in summary["targets"]:
        value = "" if row["value"] is None else f"{row['value']:.4g}"
        print(f"{row['letter']} {row['target']:<30} {value:>9}   {row['op']} {row['threshold']:<7} {row['status']}"
              + (f" ({row['reason'][:90]})" if row["reason"] else ""))
    print(f"\n{summary['device']}, commit {summary['commit']}, {summary['seconds']} s of {summary['budget_s']:.0f}; "
          f"targets: {summary['targets_count']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU at CI size, seconds per stage; records go to a "
                        "temp dir (never bench/results)")
    parser.add_argument("--out", type=Path, help="copy the summary, the records and the logs' tarball here "
                        "($OUT on a device: at most 8 files)")
    parser.add_argument("--results", type=Path, help="where the benchmarks write their records (default "
                        "bench/results; --smoke: a temp dir)")
    parser.add_argument("--work", type=Path, help="models, shards, logs (default: a temp dir)")
    parser.add_argument("--stages", default=",".join(STAGES), help="which stages, in this order (default "
                        "%(default)s: quality last takes what is left of the budget)")
    parser.add_argument("--budget-s", type=float, default=540, help="the whole suite, install included "
                        "(default %(default)s: 9 minutes)")
    parser.add_argument("--finalize-s", type=float, default=20, help="kept back for stopping a late stage, the "
                        "summary and --out (default %(default)s)")
    parser.add_argument("--quality-minutes", type=float, default=5, help="training minutes at most (default 5)")
    parser.add_argument("--quality-min-minutes", type=float, default=1,
                        help="skip quality when fewer training minutes are left (default 1)")
    parser.add_argument("--quality-reserve-s", type=float, default=120, help="quality's time besides training: "
                        "start, calibration, export, evaluation (default %(default)s)")
    parser.add_argument("--carried", type=Path, help="install what `make gpu-wheels` packed here (.gpu) first")
    parser.add_argument("--site", type=Path, help="where --carried installs to (default /tmp/site), ahead of "
                        "everything else on the children's PYTHONPATH")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--job-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--want-cuda", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.job:  # a preparation job, in its own process
        sys.path.insert(0, str(BENCH))
        import common  # noqa: F401  (puts the repository on sys.path)

        {"probe": lambda: job_probe(args.job_out, args.want_cuda),
         "model": lambda: job_model(args.job_out, args.arch, args.image_size),
         "jpeg-shards": lambda: job_jpeg_shards(args.job_out, args.count),
         "fmnist-shards": lambda: job_fmnist_shards(args.job_out, args.limit)}[args.job]()
        return 0

    started = time.monotonic()
    sys.path.insert(0, str(BENCH))
    from common import write_record

    sizes = smoke_sizes() if args.smoke else gpu_sizes(os.cpu_count() or 1)
    if args.smoke:
        if args.results and args.results.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes into bench/results")
        args.results = args.results or Path(tempfile.mkdtemp(prefix="gpu-suite-smoke-results-"))
    args.results = args.results or RESULTS
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    args.work.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")

    install = None
    if args.carried:
        args.site = args.site or Path("/tmp/site")
        (args.work / "logs").mkdir(parents=True, exist_ok=True)
        try:
            install = install_carried(args.carried, args.site, args.work / "logs" / "install.log")
            os.environ.update(install.get("env", {}))
        except Exception as exc:  # noqa: BLE001 - the stages that need it say so; the rest still runs
            install = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"[suite] install: {json.dumps(install)}", flush=True)
    suite = Suite(args, sizes, started)
    suite.say(f"{'smoke (CPU, CI size)' if sizes.smoke else 'GPU'} run of {', '.join(stages)}; budget "
              f"{args.budget_s:.0f} s; records to {args.results}; work in {args.work}")
    suite.run_prepare(stages)
    for stage in stages:
        suite.run_stage(stage)

    summary = suite.summary(install)
    date = datetime.date.today().isoformat()
    summary_path = args.results / re.sub(r"[^A-Za-z0-9._-]", "_", f"suite-{summary['device']}-{date}.json")
    write_record(summary_path, summary)
    suite.record_paths["suite"] = []
    if args.out:
        summary["out_files"] = suite.write_out(summary_path, args.out)
        write_record(summary_path, summary)
        shutil.copyfile(summary_path, args.out / re.sub(r"[^A-Za-z0-9._-]", "_", summary_path.name))
    print_table(summary)
    print(f"wrote {summary_path}" + (f" and {len(summary['out_files'])} files to {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
