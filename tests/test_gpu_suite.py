"""bench/gpu_suite.py: the one device call of issue 15, known to work before any GPU time is spent.

The slow test runs the whole suite with --smoke (CPU, CI size) and checks what a device run must deliver:
every stage ran, the summary names each stage's status, reason, seconds and records, the issue's targets
are compared, and --out holds what a device's $OUT brings back (at most 8 plain files, 16 MiB each, no
folders). The fast ones check the parts a smoke run does not reach: installing what `make gpu-wheels`
packed, bundling many records, targets that cannot be measured.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = {"train", "embed", "serve", "quality"}
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def results_state() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (REPO / "bench" / "results").iterdir()}


def check_out_folder(out: Path) -> list[str]:
    """What a device's $OUT brings back: at most 8 files, 16 MiB each, plain names; nothing deeper."""
    entries = list(out.iterdir())
    assert all(entry.is_file() and not entry.is_symlink() for entry in entries), entries
    assert len(entries) <= 8
    assert all(OUT_NAME.match(entry.name) for entry in entries)
    assert all(entry.stat().st_size <= 16 * 2**20 for entry in entries)
    return sorted(entry.name for entry in entries)


@pytest.mark.slow
def test_smoke_runs_every_stage_on_the_cpu(tmp_path, fashion_mnist):
    before = results_state()
    out, work, results = tmp_path / "out", tmp_path / "work", tmp_path / "results"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--smoke", "--out", str(out),
                          "--work", str(work), "--results", str(results)],
                         capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert results_state() == before, "a smoke run never writes into bench/results"

    (summary_path,) = results.glob("suite-*.json")
    summary = json.loads(summary_path.read_text())
    assert summary["smoke"] is True and summary["device"].startswith("cpu-") and summary["commit"]
    assert set(summary["stages"]) == STAGES
    for name, stage in summary["stages"].items():
        assert stage["status"] == "ran", (name, stage["reason"], (work / "logs" / f"{name}.log").read_text()[-2000:])
        assert stage["seconds"] > 0 and stage["budget_s"] > 0 and stage["command"] and stage["log"] == f"{name}.log"
        assert stage["records"] and all((results / record).is_file() for record in stage["records"])
    records = {name: json.loads((results / stage["records"][-1]).read_text())
               for name, stage in summary["stages"].items()}
    assert records["train"]["precision"] == "fp32" and records["train"]["gpu_views"]["pairs_per_s"] > 0
    assert records["embed"]["config"]["providers"][0] == "CPUExecutionProvider" and records["embed"]["ratio"] > 0
    assert records["serve"]["provider"] == "CPUExecutionProvider" and records["serve"]["failures"] == {}
    assert records["quality"]["preset"] == "tiny" and 0 < records["quality"]["knn"] <= 1
    assert all(summary["prepare"][job]["ok"] for job in ("probe", "model", "jpeg-shards", "fmnist-shards"))

    targets = summary["targets"]
    assert len(targets) == 10 and {t["stage"] for t in targets} == STAGES
    assert all(t["status"] in ("met", "not met") and isinstance(t["value"], (int, float)) for t in targets), targets
    assert summary["targets_count"]["not measured"] == 0

    names = check_out_folder(out)
    record_names = {record for stage in summary["stages"].values() for record in stage["records"]}
    assert set(names) == {summary_path.name, "suite-logs.tar.gz", *record_names}
    assert json.loads((out / summary_path.name).read_text())["out_files"] == summary["out_files"]
    with tarfile.open(out / "suite-logs.tar.gz") as logs:
        logged = set(logs.getnames())
    assert {f"{name}.log" for name in STAGES} | {"serve-server.log", "prepare-probe.log"} <= logged
    assert "targets" in run.stdout and "quality" in run.stdout  # the table at the end of the output


def test_smoke_refuses_bench_results(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--smoke", "--results",
                          str(REPO / "bench" / "results")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 2 and "never writes into bench/results" in run.stderr


def dummy_wheel(folder: Path) -> Path:
    path = folder / "gpusuitedummy-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("gpusuitedummy/__init__.py", "VALUE = 7\n")
        info = "gpusuitedummy-0.1.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpusuitedummy\nVersion: 0.1\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr("gpusuitedummy-0.1.dist-info/RECORD", "")
    return path


def pack(carried: Path, pieces: int = 3) -> None:
    """A carried folder as bench/gpu_wheels.py writes it: base/ (wheels, Fashion-MNIST, manifest) and an
    xz tar of a site tree in `pieces` folders."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for name, text in (("fakeort/__init__.py", "import os\nVALUE = 'gpu'\n" + "# padding\n" * 2000),
                           ("fakeort-1.0.dist-info/METADATA", "Name: fakeort\nVersion: 1.0\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    blob = buffer.getvalue()
    size = -(-len(blob) // pieces)
    entries = []
    for number in range(pieces):
        chunk = blob[number * size:(number + 1) * size]
        path = carried / f"ort-{number + 1}" / f"onnxruntime-gpu.tar.xz.part-{number + 1}"
        path.parent.mkdir(parents=True)
        path.write_bytes(chunk)
        entries.append({"path": str(path.relative_to(carried)), "bytes": len(chunk),
                        "sha256": hashlib.sha256(chunk).hexdigest()})
    (carried / "base" / "wheels").mkdir(parents=True)
    dummy_wheel(carried / "base" / "wheels")
    (carried / "base" / "fashion-mnist").mkdir()
    (carried / "base" / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x"))
    manifest = {"created": "now", "commit": "abc1234", "python": "3.12",
                "onnxruntime_gpu": {"version": "1.0", "pieces": entries}}
    (carried / "base" / "manifest.json").write_text(json.dumps(manifest))


def test_install_carried_reassembles_the_pieces_and_installs_the_wheels(tmp_path, suite, monkeypatch):
    assert lzma  # the device's python3 decompresses xz itself
    for name in ("BARLOW_FASHION_MNIST_DIR", "BARLOW_COMMIT"):
        monkeypatch.delenv(name, raising=False)
    carried = tmp_path / "gpu"
    pack(carried)
    site = tmp_path / "site"
    result = suite.install_carried(carried, site, tmp_path / "install.log")
    assert result["onnxruntime_gpu"] == {"installed": True, "version": "1.0"}
    assert result["wheels"] == {"count": 1, "ok": True}
    assert "VALUE = 'gpu'" in (site / "fakeort" / "__init__.py").read_text()
    assert (site / "gpusuitedummy" / "__init__.py").is_file()
    assert result["env"] == {"BARLOW_FASHION_MNIST_DIR": str((carried / "base" / "fashion-mnist").resolve()),
                             "BARLOW_COMMIT": "abc1234"}
    assert "BARLOW_FASHION_MNIST_DIR" not in os.environ, "the caller exports it; the test process stays clean"

    (carried / "ort-2" / "onnxruntime-gpu.tar.xz.part-2").unlink()  # the machine went back between calls
    result = suite.install_carried(carried, tmp_path / "site2", tmp_path / "install.log")
    assert result["onnxruntime_gpu"]["installed"] is False
    assert result["onnxruntime_gpu"]["missing"] == ["ort-2/onnxruntime-gpu.tar.xz.part-2"]
    assert result["wheels"]["ok"] and (tmp_path / "site2" / "gpusuitedummy").is_dir()  # the rest still installs
    assert "error" in suite.install_carried(tmp_path / "nothing", tmp_path / "site3", tmp_path / "install.log")


def test_targets_not_measured_say_why(suite):
    stages = {"train": {"status": "ran", "seconds": 100}, "quality": {"status": "ran", "seconds": 420},
              "serve": {"status": "ran", "seconds": 80}, "embed": {"status": "skipped", "reason": "no CUDA provider"}}
    records = {"train": {"synthetic": {"pairs_per_s": 2700}, "gpu_views_over_synthetic": 0.89,
                         "gpu_views": {"pairs_per_s": 2400, "data_wait_fraction": 0.2}},
               "quality": {"knn": 0.91, "linear": 0.919},
               "serve": {"provider": "CPUExecutionProvider", "served_over_raw": 0.9, "served_images_per_s": 50}}
    rows = {row["target"]: row for row in suite.compare_targets(stages, records, "CUDAExecutionProvider")}
    assert rows["synthetic pairs/s"]["status"] == "met" and rows["GPU views pairs/s"]["status"] == "not met"
    assert rows["GPU views data wait fraction"]["status"] == "not met"
    assert rows["fmnist kNN top-1"]["status"] == "met" and rows["fmnist linear top-1"]["status"] == "not met"
    assert rows["fmnist minutes in total"] == {**rows["fmnist minutes in total"], "value": 7.0, "status": "met"}
    assert rows["/embed served / raw"]["status"] == "not measured"
    assert "CPUExecutionProvider" in rows["/embed served / raw"]["reason"]
    embed = rows["barlow embed / raw"]
    assert embed["status"] == "not measured" and "no CUDA provider" in embed["reason"]


def test_many_records_come_back_as_one_tarball(tmp_path, suite):
    args = Namespace(budget_s=60, finalize_s=5, work=tmp_path / "work", results=tmp_path / "results", site=None)
    run = suite.Suite(args, suite.smoke_sizes(), 0.0)
    paths = []
    for number in range(9):
        path = args.results / f"record-{number} (odd name).json"
        path.write_text(json.dumps({"number": number}))
        paths.append(path)
    run.record_paths = {"train": paths}
    (run.logs / "train.log").write_bytes(b"x" * (3 * 2**20))  # only the tail travels
    summary = args.results / "suite-cpu-2core-2026-01-01.json"
    summary.write_text("{}")
    names = run.write_out(summary, tmp_path / "out")
    assert check_out_folder(tmp_path / "out") == sorted(names)
    assert sorted(names) == ["suite-cpu-2core-2026-01-01.json", "suite-logs.tar.gz", "suite-records.tar.gz"]
    with tarfile.open(tmp_path / "out" / "suite-records.tar.gz") as bundle:
        assert len(bundle.getnames()) == 9 and all(OUT_NAME.match(name) for name in bundle.getnames())
    with tarfile.open(tmp_path / "out" / "suite-logs.tar.gz") as logs:
        assert logs.getmember("train.log").size == 2 * 2**20


def gpu_suite_at(suite, tmp_path, elapsed: float):
    """A GPU run's Suite `elapsed` seconds in, everything prepared and installed."""
    import time

    args = Namespace(budget_s=540, finalize_s=20, quality_minutes=5, quality_min_minutes=1, quality_reserve_s=120,
                     work=tmp_path / "work", results=tmp_path / "results", site=None)
    run = suite.Suite(args, suite.gpu_sizes(16), time.monotonic() - elapsed)
    run.prepare = {job: {"ok": True} for job in ("probe", "model", "jpeg-shards", "fmnist-shards")}
    run.probe = {"cuda": True, "webdataset": {"ok": True}, "bentoml": {"ok": True},
                 "onnxruntime": {"ok": True, "cuda_session": {"ok": True}}}
    return run


def test_gpu_commands_and_quality_minutes(tmp_path, suite):
    run = gpu_suite_at(suite, tmp_path, elapsed=0)
    train, budget = run.command("train")
    assert budget == 160 and train[train.index("--steps") + 1] == "50" and train[train.index("--batch") + 1] == "256"
    assert train[train.index("--image-size") + 1] == "224" and "--shards" in train
    serve, _ = run.command("serve")
    assert serve[serve.index("--clients") + 1] == "64" and "BARLOW_DEVICE=cuda" in serve
    embed, _ = run.command("embed")
    assert embed[embed.index("--provider") + 1] == "cuda" and "--model-dir" in embed
    quality, budget = run.command("quality")
    assert budget == 440 and quality[quality.index("--minutes") + 1] == "5.00"  # at most 5 minutes of training

    run = gpu_suite_at(suite, tmp_path, elapsed=300)  # 220 s left: the rest less the reserve
    quality, budget = run.command("quality")
    assert abs(budget - 220) < 1 and quality[quality.index("--minutes") + 1] in ("1.66", "1.67")
    run = gpu_suite_at(suite, tmp_path, elapsed=420)
    assert run.command("quality")[0] is None and "under 1 minutes of training" in run.command("quality")[1]
    assert abs(run.command("train")[1] - 100) < 1  # a throughput stage takes what is left

    run = gpu_suite_at(suite, tmp_path, elapsed=0)
    run.probe["onnxruntime"] = {"ok": True, "distributions": {"onnxruntime": "1.30.0", "onnxruntime-gpu": None},
                                "cuda_session": {"ok": False, "error": "onnxruntime 1.30.0 has no CUDA provider"}}
    del run.probe["bentoml"]
    assert run.missing("train") is None and run.missing("quality") is None
    assert "no ONNX Runtime CUDA provider" in run.missing("embed") and "onnxruntime 1.30.0" in run.missing("embed")
    assert "bentoml is not installed" in run.missing("serve")
    run.probe["cuda"] = False
    assert run.missing("train") == "torch sees no CUDA GPU"


@pytest.mark.slow
def test_gpu_commands_use_flags_the_benchmarks_have(tmp_path, suite):
    """Drift check: every flag the GPU and smoke sizes pass is in the benchmark's --help."""
    scripts = {"train": "train_throughput.py", "embed": "embed_throughput.py", "serve": "serve_throughput.py",
               "quality": "quality.py"}
    for stage, script in scripts.items():
        help_text = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], capture_output=True,
                                   text=True, timeout=120, cwd=tmp_path).stdout
        for sizes in (suite.gpu_sizes(16), suite.smoke_sizes()):
            flags = [arg for arg in getattr(sizes, stage) if arg.startswith("--")]
            flags += {"train": ["--images", "--shards", "--out"], "embed": ["--model-dir", "--out"],
                      "serve": ["--model-dir", "--log", "--out"], "quality": ["--minutes", "--work", "--out"]}[stage]
            missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", help_text)]
            assert not missing, f"{script} has no {missing}"
