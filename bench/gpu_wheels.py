"""Pack what the GPU suite needs on a device machine, which reaches no registry: `make gpu-wheels`.

The device's image has Python 3.12, torch 2.11, torchvision 0.26 and a CPU-only onnxruntime, and lacks
bentoml, webdataset and Fashion-MNIST. For CPython --python-version on manylinux x86-64 this writes, under
.gpu/ (ignored by git):

  base/wheels/         bench/gpu_wheels.txt's wheels but onnxruntime-gpu (bentoml and what it needs that
                       the image lacks, webdataset, orjson, httptools: about 8 MB), fetched with --no-deps
  base/fashion-mnist/  Fashion-MNIST's four .gz files (31 MB), for bench/quality.py
  base/manifest.json   the pieces below (bytes, sha256), the versions, the commit
  ort-1/ ... ort-N/    onnxruntime-gpu, each folder one piece of at most --piece-mib (60) MiB

onnxruntime-gpu's wheel is 256 MB, 231 MB of it its CUDA provider, which deflate barely shrinks. So the
wheel is slimmed (without libonnxruntime.so, the C API library that Python never loads, and the TensorRT
provider: the image has no TensorRT), installed into a folder (pip --target, for the device's Python and
platform), tarred and compressed with xz: about 185 MiB instead of 232, so with the 38 MiB of base it
travels in 4 device calls instead of 5 (64 MiB a call, the working tree included). The xz takes a few
minutes once; the result is cached under .gpu/cache by the wheel's sha256.

On the device, bench/gpu_suite.sh (gpu_suite.py --carried .gpu) checks each piece against the manifest,
extracts the pieces' concatenation into /tmp/site, pip-installs base/wheels there (--no-index --no-deps),
points BARLOW_FASHION_MNIST_DIR at base/fashion-mnist, and runs the suite with PYTHONPATH=/tmp/site.

Last, this prints the device calls (docs/gpu-suite.md): the pieces one a call, back to back (a warm machine
keeps ignored files between calls, for 30 s), and the last call carrying base with the last piece and
running the suite.

    python bench/gpu_wheels.py                 # make gpu-wheels
    python bench/gpu_wheels.py --python-version 3.12 --piece-mib 60
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402,F401  (puts the repository on sys.path)

from pipeline.runtime import sha256_file  # noqa: E402

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
SLIM_DROP = ("onnxruntime/capi/libonnxruntime.so.", "onnxruntime/capi/libonnxruntime_providers_tensorrt.so")
SLIM_RECIPE = "1"  # bump when SLIM_DROP or the packing changes: the cache key
CALL_MIB = 64  # what one device call carries, the working tree included
ORT_TAR = "onnxruntime-gpu.tar.xz"


def say(text: str) -> None:
    print(text, flush=True)


def pins(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def platform_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform_tag in PLATFORMS:
        args += ["--platform", platform_tag]
    return args


def download(requirements: list[str], dest: Path, python_version: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
               *platform_args(python_version), "-d", str(dest), *requirements]
    subprocess.run(command, check=True)


def wheel_for(name: str, folder: Path) -> Path:
    """The one wheel of distribution `name` (== pin) in `folder`."""
    stem = name.split("==")[0].lower().replace("-", "_").replace(".", "_")
    version = name.split("==")[1] if "==" in name else None
    found = [p for p in folder.glob("*.whl") if p.name.lower().split("-")[0] == stem
             and (version is None or p.name.split("-")[1] == version)]
    if len(found) != 1:
        raise SystemExit(f"expected one wheel of {name} in {folder}, found {[p.name for p in found]}")
    return found[0]


def slim_wheel(source: Path, dest_dir: Path) -> Path:
    """The wheel without SLIM_DROP's files (and their RECORD lines), same name, in `dest_dir`."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / source.name
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        for info in zin.infolist():
            if info.filename.startswith(SLIM_DROP):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(True)
                                if not line.split(b",")[0].decode().startswith(SLIM_DROP))
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
    return dest


def pack_onnxruntime(wheel: Path, cache: Path, python_version: str) -> Path:
    """onnxruntime-gpu slimmed, installed into a folder for the device's Python, as one .tar.xz (cached)."""
    key = f"{wheel.stem}-{sha256_file(wheel)[:12]}-slim{SLIM_RECIPE}"
    packed = cache / f"{key}.tar.xz"
    if packed.is_file():
        say(f"onnxruntime-gpu: cached {packed.name} ({packed.stat().st_size / 2**20:.1f} MiB)")
        return packed
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        slim = slim_wheel(wheel, Path(tmp) / "slim")
        site = Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", *platform_args(python_version), "--target", str(site),
                        str(slim)], check=True)
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter
        say(f"onnxruntime-gpu: compressing {sum(p.stat().st_size for p in site.rglob('*') if p.is_file()) / 2**20:.0f}"
            " MiB with xz (a few minutes, once)")
        partial = packed.with_suffix(".partial")
        if shutil.which("xz") and shutil.which("tar"):  # several threads
            with open(partial, "wb") as output:
                tar = subprocess.Popen(["tar", "-C", str(site), "--owner=0", "--group=0", "--sort=name", "-cf", "-",
                                        "."], stdout=subprocess.PIPE)
                subprocess.run(["xz", "-6", "-T0", "-c"], stdin=tar.stdout, stdout=output, check=True)
                if tar.wait() != 0:
                    raise SystemExit("tar failed")
        else:
            import tarfile

            with tarfile.open(partial, "w:xz", preset=6) as archive:
                archive.add(site, arcname=".")
        partial.rename(packed)
    say(f"onnxruntime-gpu: {packed.name} {packed.stat().st_size / 2**20:.1f} MiB")
    return packed


def split(packed: Path, gpu: Path, piece_bytes: int) -> list[dict]:
    """.gpu/ort-K/<name>.part-K: consecutive pieces of `packed`, each with its size and sha256."""
    for old in gpu.glob("ort-*"):
        shutil.rmtree(old)
    pieces = []
    with open(packed, "rb") as source:
        number = 0
        while chunk := source.read(piece_bytes):
            number += 1
            folder = gpu / f"ort-{number}"
            folder.mkdir(parents=True)
            path = folder / f"{ORT_TAR}.part-{number}"
            path.write_bytes(chunk)
            pieces.append({"path": str(path.relative_to(gpu)), "bytes": len(chunk),
                           "sha256": hashlib.sha256(chunk).hexdigest()})
    return pieces


def tree_bytes() -> int:
    """What every call sends besides its carry: tracked and untracked-not-ignored files."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((ROOT / name).stat().st_size for name in names if name and (ROOT / name).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def plan_calls(gpu: Path, pieces: list[dict], tree: int, commit: str) -> list[dict]:
    """The device calls: each piece alone, back to back, and base with the last piece (when it fits) in the
    call that runs the suite."""
    base = folder_bytes(gpu / "base")
    limit = CALL_MIB * 2**20 - 2**20  # a MiB of room for the tree's growth
    folders = [str(Path(p["path"]).parent) for p in pieces]
    sizes = [folder_bytes(gpu / f) for f in folders]
    calls = [{"carry": [f".gpu/{f}"], "bytes": s + tree, "command": "true"} for f, s in zip(folders, sizes)]
    last = {"carry": [".gpu/base"], "bytes": base + tree,
            "command": f"BARLOW_COMMIT={commit} bash bench/gpu_suite.sh", "timeout_s": 600}
    if calls and calls[-1]["bytes"] + base <= limit:
        last["carry"].insert(0, calls[-1]["carry"][0])
        last["bytes"] += sizes[-1]
        calls.pop()
    calls.append(last)
    for call in calls:
        call["mib"] = round(call["bytes"] / 2**20, 1)
        if call["bytes"] > limit:
            raise SystemExit(f"a call would carry {call['mib']} MiB, over {CALL_MIB - 1}: {call['carry']}")
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12", help="the device's Python (default %(default)s)")
    parser.add_argument("--piece-mib", type=int, default=60, help="largest piece (default %(default)s MiB)")
    parser.add_argument("--requirements", type=Path, default=ROOT / "bench" / "gpu_wheels.txt")
    parser.add_argument("--gpu", type=Path, default=ROOT / ".gpu", help="the ignored folder (default .gpu)")
    args = parser.parse_args()

    from common import commit  # also puts the repository on sys.path
    from pipeline.data.fashion_mnist import fashion_mnist_dir

    gpu, cache = args.gpu, args.gpu / "cache"
    requirements = pins(args.requirements)
    ort_pin = next(r for r in requirements if r.startswith("onnxruntime-gpu=="))
    say(f"downloading {len(requirements)} wheels for CPython {args.python_version} on manylinux x86-64")
    download(requirements, cache / "wheels", args.python_version)

    base = gpu / "base"
    shutil.rmtree(base, ignore_errors=True)
    (base / "wheels").mkdir(parents=True)
    for requirement in requirements:
        if requirement != ort_pin:
            shutil.copy(wheel_for(requirement, cache / "wheels"), base / "wheels")
    fmnist = fashion_mnist_dir()
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    if not all((fmnist / name).is_file() for name in names):
        raise SystemExit(f"Fashion-MNIST is not in {fmnist}: make data, or set BARLOW_FASHION_MNIST_DIR")
    (base / "fashion-mnist").mkdir()
    for name in names:
        shutil.copy(fmnist / name, base / "fashion-mnist" / name)

    wheel = wheel_for(ort_pin, cache / "wheels")
    packed = pack_onnxruntime(wheel, cache, args.python_version)
    pieces = split(packed, gpu, args.piece_mib * 2**20)
    code = commit()
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": code, "python": args.python_version,
        "wheels": sorted(p.name for p in (base / "wheels").glob("*.whl")),
        "onnxruntime_gpu": {"version": ort_pin.split("==")[1], "wheel": wheel.name, "wheel_sha256": sha256_file(wheel),
                            "dropped": list(SLIM_DROP), "archive": ORT_TAR, "bytes": packed.stat().st_size,
                            "pieces": pieces},
    }
    (base / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    calls = plan_calls(gpu, pieces, tree_bytes(), code)
    (gpu / "calls.json").write_text(json.dumps(calls, indent=1) + "\n")
    say(f"\n{len(pieces)} pieces of onnxruntime-gpu, base {folder_bytes(base) / 2**20:.1f} MiB "
        f"({len(manifest['wheels'])} wheels, Fashion-MNIST), commit {code}. The device calls, back to back "
        "(docs/gpu-suite.md):")
    for number, call in enumerate(calls, 1):
        timeout = f", timeout_s {call['timeout_s']}" if "timeout_s" in call else ""
        say(f"  {number}. run(command={call['command']!r}, carry={json.dumps(call['carry'])}{timeout})"
            f"   # {call['mib']} MiB with the tree")
    if code.endswith("-dirty"):
        say("the tree differs from the commit: commit first, or the records will say -dirty")
    return 0


if __name__ == "__main__":
    sys.exit(main())
