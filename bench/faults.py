"""Fault injection with more repetitions than CI: the scenarios of tests/test_faults.py (tests/helpers_faults.py).

- training: kill -9 of the process group at --train-kills seeded random moments, then resume; the end
  state must equal an uninterrupted run bit for bit (CPU, train.deterministic=true, OMP_NUM_THREADS=1);
- a checkpoint save killed halfway through its bytes, and one refused by RLIMIT_FSIZE (EFBIG);
- two shards deleted and two truncated while training reads them;
- `barlow embed` killed --embed-kills times: right at start, at random moments and inside part writes;
- the server's faults, --serve-rounds times each: SIGTERM under load (tests/test_service.py), the
  encoder process and an HTTP worker SIGKILLed under load (tests/test_reliability.py), run as those
  tests through pytest, each run one injected fault that survived when its test passed.
Prints a summary and merges a "faults" key into bench/results/reliability-<UTC date>.json, keeping the
keys other benchmarks wrote there. A scenario that does not survive is recorded with its error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, commit, device_label, merge_record, random_model  # noqa: E402  (puts the repo on sys.path)

sys.path.insert(0, str(ROOT / "tests"))
from helpers_faults import (checkpoint_file_size_limit, checkpoint_kill_during_save, embed_random_kills,  # noqa: E402
                            reference_run, shard_faults_mid_epoch, train_random_kills)
from pipeline.data.shards import write_shards  # noqa: E402


def scenario(name: str, injected_if_failed: int, function, *args, **kwargs) -> dict:
    """Run one scenario; a failed check is recorded (survived 0, the assertion's sentence), not raised."""
    started = time.perf_counter()
    try:
        result = function(*args, **kwargs)
    except AssertionError as exc:
        result = {"injected": injected_if_failed, "survived": 0, "error": str(exc)[:2000]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{name}: injected {result['injected']}, survived {result['survived']} ({result['seconds']} s)"
          + (f"; FAILED: {result['error'][:300]}" if "error" in result else ""), flush=True)
    return result


SERVE_FAULTS = {
    "serve_sigterm_under_load": "tests/test_service.py::test_sigterm_drains_in_flight_requests_and_barlow_serve_exits_0",
    "serve_encoder_killed": "tests/test_reliability.py::"
                            "test_killed_encoder_is_replaced_and_requests_in_the_gap_get_200_or_json_503",
    "serve_embedder_worker_killed": "tests/test_reliability.py::test_killed_embedder_worker_is_replaced_and_serves_again",
}


def serve_faults(rounds: int) -> dict:
    """Each server fault test `rounds` times (one pytest process per round holds all three)."""
    import xml.etree.ElementTree as ET  # nosec B405: parses the report pytest just wrote here

    outcomes = {name: {"injected": 0, "survived": 0, "test": test, "errors": []} for name, test in SERVE_FAULTS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(rounds):
            report = Path(tmp) / f"round-{round_number}.xml"
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                            *SERVE_FAULTS.values()], cwd=ROOT, capture_output=True, timeout=1800)
            cases = {case.get("name"): case for case in ET.parse(report).iter("testcase")} if report.exists() else {}
            for name, test in SERVE_FAULTS.items():
                case = cases.get(test.split("::")[-1])
                outcomes[name]["injected"] += 1
                found = [] if case is None else [case.find(tag) for tag in ("failure", "error", "skipped")]
                failure = next((element for element in found if element is not None), None)  # Elements are falsy
                if case is not None and failure is None:
                    outcomes[name]["survived"] += 1
                else:
                    outcomes[name]["errors"].append("not run" if case is None else (failure.get("message") or "")[:300])
            print(f"server faults round {round_number + 1}: " + ", ".join(
                f"{name} {o['survived']}/{o['injected']}" for name, o in outcomes.items()), flush=True)
    for outcome in outcomes.values():
        outcome["checked_against"] = "the test's assertions (see its docstring): for SIGTERM no accepted request lost " \
            "and exit 0; for a killed process a new one serves, /readyz 200, and responses only 200 or JSON 503"
    return outcomes


def pipeline_faults(args: argparse.Namespace, checkpoint_every: int) -> dict:
    """The training and batch-embedding scenarios of tests/helpers_faults.py."""
    faults: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "shards"
        write_shards("fashion-mnist:test", shards, per_shard=48, limit=200)
        reference = reference_run(shards, tmp / "reference", args.steps, checkpoint_every)
        print(f"reference: {args.steps} steps, start-up {reference.startup_s:.1f} s, {reference.step_s:.2f} s/step",
              flush=True)
        faults["train_kill9_random"] = scenario(
            "training kill -9", args.train_kills, train_random_kills, reference, tmp / "killed",
            kills=args.train_kills, seed=args.seed)
        faults["checkpoint_kill_during_save"] = scenario(
            "checkpoint save killed halfway", 1, checkpoint_kill_during_save, reference, tmp / "save-killed",
            checkpoint_every)
        faults["checkpoint_file_size_limit"] = scenario(
            "checkpoint save refused (RLIMIT_FSIZE)", 1, checkpoint_file_size_limit, reference, tmp / "fsize")

        small = tmp / "small-shards"
        write_shards("fashion-mnist:test", small, per_shard=16, limit=96)
        faults["shards_vanished_or_truncated"] = scenario(
            "shards deleted / truncated mid-epoch", 4, shard_faults_mid_epoch, small, tmp / "shard-faults", steps=12,
            vanish=["shard-000001.tar", "shard-000004.tar"], truncate=["shard-000002.tar", "shard-000003.tar"])

        embed_shards = tmp / "embed-shards"
        write_shards("fashion-mnist:test", embed_shards, per_shard=16, limit=320)
        model_dir = random_model(tmp / "model", "resnet18", 32)
        faults["embed_kill9_random"] = scenario(
            "embed kill -9", args.embed_kills, embed_random_kills, model_dir, embed_shards, tmp / "embed",
            kills=args.embed_kills, seed=args.seed, write_kills=2)

    return faults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-kills", type=int, default=10, help="kill -9 during training (default %(default)s)")
    parser.add_argument("--embed-kills", type=int, default=10, help="kill -9 during embedding (default %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="training steps, tiny preset (default %(default)s)")
    parser.add_argument("--serve-rounds", type=int, default=3,
                        help="runs of each server fault test (default %(default)s; 0: none)")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the server faults")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record")
    args = parser.parse_args()
    checkpoint_every = 2
    code = commit()  # before the run: the code that was tested

    path = args.out / f"reliability-{datetime.datetime.now(datetime.timezone.utc).date().isoformat()}.json"
    earlier = json.loads(path.read_text()).get("faults", {}) if path.exists() else {}
    if args.skip_pipeline:  # keep the pipeline scenarios of the last full run
        faults = {k: v for k, v in earlier.items() if isinstance(v, dict) and "injected" in v and k not in SERVE_FAULTS}
    else:
        faults = pipeline_faults(args, checkpoint_every)
    if args.serve_rounds:
        faults.update(serve_faults(args.serve_rounds))
    injected = sum(f["injected"] for f in faults.values())
    survived = sum(f["survived"] for f in faults.values())
    record = {
        **faults,
        "injected": injected, "survived": survived,
        "setup": {"training": f"tiny preset (ResNet-18 16 px, projector 64-64, batch 16), {args.steps} steps, "
                              f"checkpoint every {checkpoint_every}, data.workers=2, train.deterministic=true, "
                              "OMP_NUM_THREADS=1, 200 Fashion-MNIST images in 5 shards",
                  "embedding": "random ResNet-18 32 px ONNX model, 320 images in 20 shards, batch 4, 1 worker, CPU",
                  "server": "the server fault tests' own model and `barlow serve` (see SERVE_FAULTS)",
                  "kill": "SIGKILL to the process group (main process and DataLoader workers) after a delay from "
                          "random.Random(seed); in-write kills SIGKILL the process from inside the file write"},
        **({"pipeline_scenarios_from": {"commit": earlier.get("commit"), "date": earlier.get("date")}}
           if args.skip_pipeline else {}),
        "seed": args.seed, "device": device_label(False), "commit": code,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    merge_record(path, "faults", record)
    print(f"{survived} of {injected} injected faults survived; recorded under 'faults' in {path}")
    return 0 if survived == injected and not any("error" in f for f in faults.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
