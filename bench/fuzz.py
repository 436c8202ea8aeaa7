"""Fuzz /embed of a real `barlow serve` with --cases mutated JPEG/PNG/GIF/WebP/TIFF files.

The same hypothesis strategies as tests/test_fuzz.py (tests/helpers_fuzz.py), many more cases,
and nothing stops at the first failure: every answer is counted by status, a 5xx, non-JSON answer
or a 4xx without an `error` sentence is a failure and its bytes are kept in --failures. The server
must still be ready at the end. Merges a "fuzz" key into bench/results/reliability-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import RESULTS, ROOT, commit, device_label, merge_record, random_model  # noqa: E402  (puts the repo on sys.path)

sys.path.insert(0, str(ROOT / "tests"))
from helpers_fuzz import check_response, hostile_image, seed_images  # noqa: E402
from pipeline.serve import start_server  # noqa: E402


def fuzz(url: str, cases: int, seed: int, failures_dir: Path) -> dict:
    import httpx
    from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings
    from hypothesis import strategies as st

    seeds = seed_images()
    statuses, by_format, failures, server_errors = Counter(), Counter(), [], []
    http = httpx.Client(base_url=url, timeout=120)

    @hypothesis_seed(seed)
    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(hostile=hostile_image(), valid_too=st.booleans())
    def one(hostile: tuple[str, bytes], valid_too: bool) -> None:
        fmt, blob = hostile
        files = [("images", (f"hostile.{fmt.lower()}", blob, "application/octet-stream"))]
        if valid_too:
            files.append(("images", ("seed.png", seeds["PNG"], "image/png")))
        response = None
        try:
            response = http.post("/embed", files=files)
            outcome = check_response(response, len(files))
        except Exception as exc:  # a 5xx, a broken answer or a dropped connection: count and keep going
            outcome = "failure"
            if response is not None and response.status_code >= 500:
                server_errors.append(response.status_code)
            failures_dir.mkdir(parents=True, exist_ok=True)
            (failures_dir / f"case-{len(failures):04d}.{fmt.lower()}").write_bytes(blob)
            failures.append(f"{fmt}: {type(exc).__name__}: {str(exc)[:200]}")
        statuses[outcome] += 1
        by_format[f"{fmt}:{outcome}"] += 1

    started = time.perf_counter()
    one()
    elapsed = time.perf_counter() - started
    ready = http.get("/readyz").status_code
    return {"cases": sum(statuses.values()), "outcomes": dict(sorted(statuses.items())),
            "by_format": dict(sorted(by_format.items())), "failures": len(failures), "failure_examples": failures[:20],
            "server_5xx": len(server_errors),
            "ready_after": ready == 200, "seconds": round(elapsed, 1), "hypothesis_seed": seed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="hostile requests (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default %(default)s)")
    parser.add_argument("--model-dir", type=Path, help="an exported MODEL_DIR (default: export a random one)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record")
    parser.add_argument("--failures", type=Path, default=Path("runs/fuzz-failures"), help="bytes of failing cases")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or random_model(Path(tmp), "resnet18", 32)
        env = {"BENTOML_HOME": str(Path(tmp) / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
        server = start_server(model_dir, env=env, log_file=Path(tmp) / "server.log")
        try:
            result = fuzz(server.url, args.cases, args.seed, args.failures)
            result["server_alive"] = server.process.poll() is None
        finally:
            result_code = server.stop()
    result.update({"server_exit": result_code, "device": device_label(False), "commit": commit(),
                   "limits": "service defaults (BARLOW_MAX_PIXELS 40 MP, 64 images, 256 MiB)"})
    path = args.out / f"reliability-{datetime.date.today().isoformat()}.json"
    merge_record(path, "fuzz", result)
    print(json.dumps(result, indent=2))
    return 0 if result["failures"] == 0 and result["ready_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
