"""schemathesis against a real `barlow serve`: every operation of /docs.json, many cases, no 5xx.

Starts the service with its defaults on a random exported model, runs `schemathesis run` on its
/docs.json with the same checks as tests/test_reliability.py (no server error, documented status,
content type, headers and body schema, schema-violating requests rejected) but --cases examples per
operation, and merges the counts into bench/results/reliability-<date>.json under "schemathesis".
/search answers 404 here (no index is configured), which the document says it does.
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

from common import RESULTS, commit, device_label, merge_record, random_model  # noqa: E402  (puts the repo on sys.path)
from pipeline.serve import start_server  # noqa: E402

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection")


def main() -> int:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300, help="examples per operation (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model(Path(tmp), "resnet18", 32)
        env = {"BENTOML_HOME": str(Path(tmp) / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
        server = start_server(model_dir, env=env, log_file=Path(tmp) / "server.log")
        report = Path(tmp) / "schemathesis.json"
        start = time.monotonic()
        try:
            result = subprocess.run(
                [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/docs.json", "--checks", CHECKS,
                 "-n", str(args.cases), "-w", "1", "--seed", str(args.seed), "--generation-database", "none",
                 "--no-color", "--report", "json", "--report-json-path", str(report)],
                capture_output=True, text=True, cwd=tmp)
            ready = httpx.get(f"{server.url}/readyz", timeout=30).status_code
            alive = server.process.poll() is None
        finally:
            exit_code = server.stop()
        record = json.loads(report.read_text())
    print(result.stdout[-3000:])
    entry = {"device": device_label(False), "commit": commit(),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "schemathesis": record["schemathesis_version"], "checks": CHECKS.split(","),
             "examples_per_operation": args.cases, "seed": args.seed,
             "operations_tested": record["operations"]["tested"], "cases": record["test_cases"]["generated"],
             "cases_with_failures": record["test_cases"]["with_failures"], "failures": record["failures"],
             "errors": record["errors"], "warnings": {k: v for k, v in record["warnings"].items() if v},
             "seconds": round(time.monotonic() - start, 1), "exit_code": result.returncode,
             "readyz_after": ready, "server_alive": alive, "server_exit": exit_code,
             "server": "barlow serve on 127.0.0.1, service defaults, no index (/search answers 404)"}
    merge_record(args.out / f"reliability-{datetime.date.today().isoformat()}.json", "schemathesis", entry)
    print(json.dumps({k: v for k, v in entry.items() if k != "checks"}))
    return 0 if result.returncode == 0 and not record["failures"] and alive else 1


if __name__ == "__main__":
    sys.exit(main())
