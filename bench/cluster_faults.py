"""What a cluster does to a two-pod training Job, on one host: tests/helpers_cluster.py runs two torchrun
agents with the barlow-train Job's rendered launch line (barlow-torchrun --nnodes=2, c10d rendezvous at
pod 0) and a small Indexed-Job controller that applies the Job's podFailurePolicy and backoffLimitPerIndex.

Scenarios (--scenarios, default a,b,c,d,e; each --repeats times):
  a  SIGTERM to pod 0's agent (the rendezvous store host), as a preemption; the controller replaces it
  b  the same for pod 1
  c  kill -9 of pod 1's worker process (the agent's child)
  d  pod 1's agent started --early seconds before pod 0's
  e  as a, and pod 0's replacement comes up at another address
Per run: recovered (the Job completes), seconds from the fault to the next training step, steps lost
(steps redone beyond the last one completed), final weights bit-identical to an uninterrupted two-pod
run (checkpoints/last.pt, torch.equal), each pod's exit codes and podFailurePolicy verdicts.
Writes bench/results/cluster-faults-<UTC date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, commit, device_label, write_record  # noqa: E402  (puts the repo on sys.path)

sys.path.insert(0, str(ROOT / "tests"))
from helpers_cluster import make_config, reference_run, run_scenario, train_container, rendered_job  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="a,b,c,d,e")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per scenario run")
    parser.add_argument("--early", type=float, default=90, help="scenario d: pod 1's head start")
    parser.add_argument("--share-store", action="store_true",
                        help="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0: torchrun's default, the Job's setting before the fix")
    parser.add_argument("--out", type=Path, help="default bench/results/cluster-faults-<date>.json")
    args = parser.parse_args()

    job = rendered_job()
    container = train_container(job)
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"} if args.share_store else None
    record = {"device": device_label(False), "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "launch_line": container["command"], "env": {e["name"]: e.get("value") for e in container["env"]},
              "pod_failure_policy": job["spec"].get("podFailurePolicy"), "env_override": env,
              "config": {"scenarios": args.scenarios, "repeats": args.repeats, "early_s": args.early,
                         "timeout_s": args.timeout}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cluster-faults-") as tmp:
        root = Path(tmp)
        config = make_config(root)
        reference, figures = reference_run(root, config)
        record["reference"] = figures
        print(f"reference: {figures['seconds']} s", flush=True)
        for kind in args.scenarios.split(","):
            for repeat in range(args.repeats):
                started = time.monotonic()
                try:
                    result = run_scenario(kind, root, config, reference, name=f"{kind}-{repeat}",
                                          timeout=args.timeout, early=args.early, env=env)
                except AssertionError as exc:
                    result = {"scenario": kind, "recovered": False, "error": str(exc)[:2000],
                              "seconds": round(time.monotonic() - started, 1)}
                result["repeat"] = repeat
                record["runs"].append(result)
                print(json.dumps(result), flush=True)
    out = args.out or RESULTS / f"cluster-faults-{record['date']}.json"
    write_record(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
