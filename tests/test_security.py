"""Static security scan: `bandit -r pipeline serving` has no medium/high finding left unjustified.

A finding may be silenced only by `# nosec BXXX` naming the test, with the line above it a comment
that starts with that id and says why it is a false positive (or intended).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("pipeline", "serving")
NOSEC = re.compile(r"#\s*nosec\b(.*)$")


def test_bandit_reports_no_medium_or_high_findings():
    result = subprocess.run([sys.executable, "-m", "bandit", "-r", *SCANNED, "-f", "json", "-q"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert report["results"] is not None and not report["errors"], report["errors"]
    serious = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
               for r in report["results"] if r["issue_severity"] in ("MEDIUM", "HIGH")]
    assert not serious, "\n".join(serious)
    assert report["metrics"]["_totals"]["loc"] > 1000  # it really scanned the packages


def test_every_nosec_names_its_test_and_says_why():
    unjustified = []
    for path in sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            match = NOSEC.search(line)
            if not match:
                continue
            ids = re.findall(r"B\d{3}", match.group(1))
            above = lines[number - 1].strip() if number else ""
            if not ids or not all(above.startswith(f"# {i}") and len(above) > 30 for i in ids):
                unjustified.append(f"{path.relative_to(ROOT)}:{number + 1}: {line.strip()}")
    assert not unjustified, "nosec without a test id and a reason on the line above:\n" + "\n".join(unjustified)
