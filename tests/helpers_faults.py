"""Fault injection for `barlow train` and `barlow embed`, shared by tests/test_faults.py and bench/faults.py.

Every fault hits a real `barlow` process working on real shards, the way a node fails:
- kill -9 of the whole process group (main process and DataLoader workers) after a delay drawn from a
  seeded `random.Random`, so some kills land in start-up/resume, some in a step, some inside a write;
- kill -9 from inside a write: the child runs `pipeline.cli.main` with `open`/`os.fdopen` wrapped so that
  the N-th file whose name contains a pattern SIGKILLs its own process after a set number of bytes;
- a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): the checkpoint write fails with EFBIG;
- shards deleted or truncated while training reads them.
Each scenario returns a JSON-able record (what was injected, what survived, what that was checked
against) and raises AssertionError, with the seed in the message, when the pipeline did not survive.

Run as a script (`python tests/helpers_faults.py write-kill SPEC barlow-args...`) it is that wrapped child.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One CPU thread and deterministic kernels: the bit-exact comparisons need identical arithmetic.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
TRAIN_KILLS_CHECKED = ("final model state bit-identical (torch.equal, every tensor) to an uninterrupted run; "
                       "metrics.jsonl steps exactly 1..N; no temp files left")


# ---------------------------------------------------------------- processes


@dataclass
class Attempt:
    """One started `barlow` process; its stdout and stderr go to `log` (a pipe could fill and block it)."""

    process: subprocess.Popen
    log: Path
    started: float

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the process group: the main process and its DataLoader workers die at once, as in a pod."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def wait(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout)
        self.kill9()  # reap orphaned workers of a process that killed itself
        return code

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start(args: list[str], log: Path, *, write_kill: dict | None = None, file_size_limit: int | None = None) -> Attempt:
    """`barlow ARGS` in its own session; `write_kill` runs it through the write-killing wrapper below."""
    if write_kill is None:
        command = [sys.executable, "-m", "pipeline.cli", *args]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "write-kill", json.dumps(write_kill), *args]

    def limit_file_size() -> None:  # runs in the child before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a too-large write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   preexec_fn=limit_file_size if file_size_limit else None)
    return Attempt(process, log, time.monotonic())


def run(args: list[str], log: Path, timeout: float = 300, **kwargs) -> tuple[int, str, float]:
    """`barlow ARGS` to the end: (exit code, its output, seconds)."""
    attempt = start(args, log, **kwargs)
    code = attempt.wait(timeout)
    return code, attempt.text(), time.monotonic() - attempt.started


def error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------- the write-killing child


def _install_write_killer(pattern: str, nth: int, after_bytes: int | None, half_of: str | None) -> None:
    """Wrap binary writes to files named like `pattern`: the `nth` one SIGKILLs this process after
    `after_bytes` bytes (or half the size `half_of` has when the file is opened) have reached the file."""
    seen = 0

    class KillingFile(io.FileIO):
        limit = 0

        def write(self, data) -> int:
            view = memoryview(data).cast("B")
            room = self.limit - self.tell()
            if len(view) < room:
                return super().write(view)
            head = view[:room]
            while len(head):  # exactly `limit` bytes reach the file, then the process dies
                head = head[super().write(head):]
            os.kill(os.getpid(), signal.SIGKILL)
            return 0  # not reached

    def wrap(raw_target, name: str, mode: str):
        nonlocal seen
        if pattern not in os.path.basename(name) or "w" not in mode or "b" not in mode:
            return None
        seen += 1
        if seen != nth:
            return None
        raw = KillingFile(raw_target, "wb", closefd=True)
        raw.limit = after_bytes if after_bytes is not None else os.path.getsize(half_of) // 2
        return io.BufferedWriter(raw)

    real_open, real_fdopen = builtins.open, os.fdopen

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            wrapped = wrap(os.fspath(file), os.fspath(file), mode)
            if wrapped is not None:
                return wrapped
        return real_open(file, mode, *args, **kwargs)

    def fdopen(fd, mode="r", *args, **kwargs):
        wrapped = wrap(fd, os.readlink(f"/proc/self/fd/{fd}"), mode)
        return wrapped if wrapped is not None else real_fdopen(fd, mode, *args, **kwargs)

    builtins.open, os.fdopen = open_, fdopen


def _child_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    _install_write_killer(spec["pattern"], spec["nth"], spec.get("after_bytes"), spec.get("half_of"))
    from pipeline import cli

    return cli.main(argv[1:])


# ---------------------------------------------------------------- training


def train_args(shards: Path, out: Path, steps: int, checkpoint_every: int) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(shards), "--out", str(out), "--steps", str(steps),
            "data.workers=2", f"train.checkpoint_every={checkpoint_every}", "train.deterministic=true"]


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            steps.append(-1)  # a torn line: never equal to a step
    return steps


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of checkpoints/last.pt; None when there is none. Raises UserError when it does not load."""
    from pipeline.train.checkpoint import TRAINING_FORMAT, safe_load

    path = run_dir / "checkpoints" / "last.pt"
    return int(safe_load(path, TRAINING_FORMAT)["step"]) if path.exists() else None


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp")) if folder.exists() else []


@dataclass
class Reference:
    """An uninterrupted training run, and how long its start-up and steps took here (to aim the kills)."""

    run_dir: Path
    args: list[str]
    steps: int
    startup_s: float
    step_s: float


def reference_run(shards: Path, out: Path, steps: int, checkpoint_every: int) -> Reference:
    attempt = start(train_args(shards, out, steps, checkpoint_every), out.parent / f"{out.name}.log")
    first_step_at = None
    while attempt.alive():
        if first_step_at is None and metric_steps(out):
            first_step_at = time.monotonic() - attempt.started
        time.sleep(0.02)
    code, total = attempt.wait(), time.monotonic() - attempt.started
    assert code == 0, attempt.text()[-3000:]
    startup = first_step_at if first_step_at is not None else total / 2
    return Reference(out, train_args(shards, out, steps, checkpoint_every), steps, startup,
                     max(total - startup, 0.1) / max(steps - 1, 1))


def model_state(run_dir: Path) -> dict:
    from pipeline.train.checkpoint import TRAINING_FORMAT, safe_load

    return safe_load(run_dir / "checkpoints" / "last.pt", TRAINING_FORMAT)["model"]


def differing_tensors(reference: Path, run_dir: Path) -> list[str]:
    import torch

    expected, actual = model_state(reference), model_state(run_dir)
    if expected.keys() != actual.keys():
        return ["<different keys>"]
    return [name for name in expected if not torch.equal(expected[name], actual[name])]


def finish_and_compare(reference: Reference, run_dir: Path, log: Path, context: str) -> dict:
    """Resume `run_dir` to the end; it must equal the reference bit for bit and log every step once."""
    args = [run_dir.as_posix() if a == reference.run_dir.as_posix() else a for a in reference.args]
    code, output, _ = run(args, log)
    assert code == 0, f"{context}: the resumed run failed: {output[-3000:]}"
    differing = differing_tensors(reference.run_dir, run_dir)
    assert not differing, f"{context}: {len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"
    steps = metric_steps(run_dir)
    assert steps == list(range(1, reference.steps + 1)), f"{context}: metrics.jsonl steps {steps}"
    leftovers = temp_files(run_dir)
    assert not leftovers, f"{context}: temp files left: {leftovers}"
    return {"resumed_ok": True, "bit_identical": True, "metrics_steps_once": True, "temp_files_left": 0}


def train_random_kills(reference: Reference, run_dir: Path, kills: int, seed: int, max_attempts: int = 0) -> dict:
    """kill -9 a resumable training run `kills` times at seeded random moments, then let it finish.

    Each delay is uniform in [0, 0.6] of the time the attempt should take: start-up plus the remaining
    steps at the reference's pace (attempts have run a quarter faster than the reference, and a kill
    drawn near the end then came after the run had finished). Start-up begins as the reference's and
    follows what the attempts show (a resume also loads the checkpoint), so the kills spread over
    start-up/resume, steps and checkpoint writes. After each kill the checkpoint on disk must load and must not have gone back.
    """
    rng = random.Random(seed)
    args = [run_dir.as_posix() if a == reference.run_dir.as_posix() else a for a in reference.args]
    records, attempts, startup_s = [], 0, reference.startup_s
    context = f"seed {seed}"
    while len(records) < kills and attempts < (max_attempts or 3 * kills):
        attempts += 1
        before = checkpoint_step(run_dir) or 0
        logged_before, temps_before = metric_steps(run_dir), temp_files(run_dir)
        delay = rng.uniform(0.0, 0.6) * (startup_s + (reference.steps - before) * reference.step_s)
        attempt = start(args, run_dir.parent / f"{run_dir.name}-attempt-{attempts}.log")
        first_step_s = None
        while attempt.alive() and time.monotonic() - attempt.started < delay:
            now = metric_steps(run_dir)
            if first_step_s is None and now != logged_before and max(now, default=0) > before:
                first_step_s = time.monotonic() - attempt.started  # this attempt's start-up, seen
            time.sleep(0.005)
        startup_s = first_step_s if first_step_s is not None else max(startup_s, delay)
        if not attempt.alive():  # finished (or failed) before the kill
            code = attempt.wait()
            assert code == 0, f"{context}: attempt {attempts} failed without a kill: {attempt.text()[-3000:]}"
            records.append({"delay_s": round(delay, 3), "killed": False})
            break
        logged = metric_steps(run_dir)
        attempt.kill9()
        in_write = [n for n in temp_files(run_dir) if n.startswith(".last.pt.") and n not in temps_before]
        after = checkpoint_step(run_dir) or 0  # raises if the kill left last.pt unloadable
        assert after >= before, f"{context}: last.pt went back from step {before} to {after}"
        stepped = logged != logged_before and max(logged, default=0) > before  # this attempt logged a step
        phase = ("checkpoint write" if in_write else "after the last step" if after == reference.steps > before
                 else "training" if stepped else "start-up/resume")
        records.append({"delay_s": round(delay, 3), "killed": True, "phase": phase, "checkpoint_step_before": before,
                        "checkpoint_step_after": after, "last_logged_step": max(logged, default=0)})
        context = f"seed {seed}, kills {[(r['delay_s'], r.get('phase')) for r in records]}"
    landed = [r for r in records if r["killed"]]
    result = finish_and_compare(reference, run_dir, run_dir.parent / f"{run_dir.name}-final.log", context)
    phases: dict[str, int] = {}
    for r in landed:
        phases[r["phase"]] = phases.get(r["phase"], 0) + 1
    return {"injected": len(landed), "survived": len(landed), "seed": seed, "checked_against": TRAIN_KILLS_CHECKED,
            "by_phase": phases, "kills": records, **result}


def checkpoint_kill_during_save(reference: Reference, run_dir: Path, checkpoint_every: int) -> dict:
    """SIGKILL from inside the second checkpoint save, after half its bytes: last.pt stays the first one."""
    args = [run_dir.as_posix() if a == reference.run_dir.as_posix() else a for a in reference.args]
    last = run_dir / "checkpoints" / "last.pt"
    spec = {"pattern": ".last.pt.", "nth": 2, "half_of": str(last)}
    code, output, _ = run(args, run_dir.parent / f"{run_dir.name}-killed.log", write_kill=spec)
    assert code == -signal.SIGKILL, f"the save was not killed (exit {code}): {output[-3000:]}"
    torn = [p.stat().st_size for p in (run_dir / "checkpoints").glob(".last.pt.*.tmp")]
    assert torn == [last.stat().st_size // 2], f"not killed halfway through the write: temp files of {torn} bytes"
    step = checkpoint_step(run_dir)
    assert step == checkpoint_every, f"last.pt is at step {step}, not the previous save's {checkpoint_every}"
    result = finish_and_compare(reference, run_dir, run_dir.parent / f"{run_dir.name}-resumed.log",
                                "kill during checkpoint save")
    return {"injected": 1, "survived": 1, "torn_temp_bytes": torn[0], "checkpoint_bytes": last.stat().st_size,
            "previous_checkpoint_step": step,
            "checked_against": "last.pt after the kill loads (safe_load) at the previous save's step; a rerun resumes "
                               "from it and ends " + TRAIN_KILLS_CHECKED, **result}


def checkpoint_file_size_limit(reference: Reference, run_dir: Path) -> dict:
    """A checkpoint save refused by RLIMIT_FSIZE (EFBIG): one sentence, exit 2, previous last.pt kept."""
    args = [run_dir.as_posix() if a == reference.run_dir.as_posix() else a for a in reference.args]
    first = start(args, run_dir.parent / f"{run_dir.name}-first.log")  # run until the first checkpoint, then die
    last = run_dir / "checkpoints" / "last.pt"
    while first.alive() and not last.exists():
        time.sleep(0.01)
    first.kill9()
    before = checkpoint_step(run_dir)
    assert before is not None, f"no checkpoint written: {first.text()[-3000:]}"
    limit = last.stat().st_size // 2
    code, output, _ = run(args, run_dir.parent / f"{run_dir.name}-limited.log", file_size_limit=limit)
    message = error_line(output)
    assert code == 2 and message.startswith("barlow train: error: cannot write") and "File too large" in message, \
        f"exit {code}: {output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    after = checkpoint_step(run_dir)
    assert after == before, f"last.pt moved from step {before} to {after}"
    assert not temp_files(run_dir), temp_files(run_dir)
    result = finish_and_compare(reference, run_dir, run_dir.parent / f"{run_dir.name}-resumed.log",
                                "file-size limit during checkpoint save")
    return {"injected": 1, "survived": 1, "file_size_limit_bytes": limit, "message": message,
            "previous_checkpoint_step": before,
            "checked_against": "exit 2 with one sentence, no traceback; last.pt unchanged and loadable; no temp file; "
                               "a rerun without the limit ends " + TRAIN_KILLS_CHECKED, **result}


def shard_faults_mid_epoch(shards: Path, run_dir: Path, steps: int, vanish: list[str], truncate: list[str],
                           after_step: int = 2) -> dict:
    """Delete some shards and cut others in half once training has logged `after_step`: the run finishes
    every step, logs each unreadable shard, and the other shards keep feeding it."""
    attempt = start(train_args(shards, run_dir, steps, 1000), run_dir.parent / f"{run_dir.name}.log")
    while attempt.alive() and max(metric_steps(run_dir), default=0) < after_step:
        time.sleep(0.01)
    assert attempt.alive(), attempt.text()[-3000:]
    for name in vanish:
        (shards / name).unlink()
    for name in truncate:
        os.truncate(shards / name, (shards / name).stat().st_size // 2)
    code = attempt.wait()
    output = attempt.text()
    assert code == 0, f"shard faults were fatal (exit {code}): {output[-3000:]}"
    assert metric_steps(run_dir) == list(range(1, steps + 1)), metric_steps(run_dir)
    assert (run_dir / "encoder.pt").is_file()
    failures = [line for line in output.splitlines() if "cannot read shard" in line]
    vanished = sorted({n for n in vanish for line in failures if n in line and "FileNotFoundError" in line})
    truncated = sorted({n for n in truncate for line in failures if n in line and "ReadError" in line})
    assert vanished and truncated, f"the faulted shards were never read again: {failures}"
    return {"injected": len(vanish) + len(truncate), "survived": len(vanish) + len(truncate),
            "vanished": vanish, "truncated": truncate, "read_after_fault": {"vanished": vanished, "truncated": truncated},
            "unreadable_logged": len(failures), "steps_done": steps,
            "checked_against": "exit 0, metrics.jsonl steps 1..N, encoder.pt written, a 'cannot read shard' warning "
                               "(FileNotFoundError / ReadError) for faulted shards read after the fault"}


# ---------------------------------------------------------------- batch embedding


def embed_args(model_dir: Path, shards: Path, out: Path) -> list[str]:
    return ["embed", str(model_dir), "--data", str(shards), "--out", str(out), "--batch-size", "4", "--workers", "1",
            "--device", "cpu"]


def read_embeddings(out: Path) -> dict[str, list[float]]:
    """key -> embedding over every part; each part must be valid parquet and no key may repeat."""
    import pyarrow.parquet as pq

    rows: dict[str, list[float]] = {}
    for part in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(part).to_pydict()
        for key, vector in zip(table["key"], table["embedding"]):
            assert key not in rows, f"key {key} twice (again in {part.name})"
            rows[key] = vector
    return rows


def kill_plan(kills: int, write_kills: int) -> list[str]:
    """'start' first, then 'part write' kills spread among 'random' ones, early enough to find parts to do."""
    step = max(1, (kills - 1) // max(write_kills, 1))
    plan, writes = ["start"], 0
    for i in range(kills - 1):
        take = writes < write_kills and i % step == 0
        writes += take
        plan.append("part write" if take else "random")
    return plan


def finish_embedding(model_dir: Path, shards: Path, out: Path, expected: dict, log: Path, context: str) -> float:
    """Rerun into `out`: every key of `expected` exactly once, in valid parts, with its embedding (max diff)."""
    import numpy as np

    code, output, _ = run(embed_args(model_dir, shards, out), log)
    assert code == 0, f"{context}: the rerun failed: {output[-3000:]}"
    rows = read_embeddings(out)
    assert sorted(rows) == sorted(expected), f"{context}: keys differ from an uninterrupted run"
    worst = max(float(np.abs(np.array(rows[k]) - np.array(expected[k])).max()) for k in expected)
    assert worst < 1e-6, f"{context}: embeddings differ from an uninterrupted run by {worst}"
    assert not temp_files(out), f"{context}: temp files left: {temp_files(out)}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == len(expected), f"{context}: manifest count {manifest['count']}"
    return worst


def embed_random_kills(model_dir: Path, shards: Path, work: Path, kills: int, seed: int, write_kills: int = 1) -> dict:
    """kill -9 `barlow embed` `kills` times: right at start, from inside a part's write (`write_kills` times) and
    at seeded random moments; a rerun must leave every key exactly once, equal to an uninterrupted run.

    A random delay is uniform in [0, 1] of the time the attempt should take: the reference run's time to its
    first part (start-up) plus the share of parts still to do of the rest. When an attempt got every part
    written before its kill, that EMB_DIR is checked and the next kills go to a fresh one (a new round).
    """
    rng = random.Random(seed)
    reference = work / "reference"
    attempt = start(embed_args(model_dir, shards, reference), work / "reference.log")
    first_part_s = None
    while attempt.alive():
        if first_part_s is None and list(reference.glob("part-*.parquet")):
            first_part_s = time.monotonic() - attempt.started
        time.sleep(0.005)
    code, seconds = attempt.wait(), time.monotonic() - attempt.started
    assert code == 0, attempt.text()[-3000:]
    first_part_s = first_part_s or seconds
    expected = read_embeddings(reference)
    part_bytes = min(p.stat().st_size for p in reference.glob("part-*.parquet"))
    parts_total = len(list(reference.glob("part-*.parquet")))

    rounds, worst, records = 1, 0.0, []
    out = work / "emb-1"
    for number, how in enumerate(kill_plan(kills, write_kills), 1):
        context = f"seed {seed}, kill {number} ({how}), round {rounds}"
        if out.exists() and not parts_total - len(list(out.glob("part-*.parquet"))):
            worst = max(worst, finish_embedding(model_dir, shards, out, expected, work / f"round-{rounds}.log", context))
            rounds += 1
            out = work / f"emb-{rounds}"
        done = len(read_embeddings(out)) if out.exists() else 0
        todo = parts_total - len(list(out.glob("part-*.parquet")))
        temps_before = temp_files(out)  # a torn part of an earlier kill stays until a run starts on its shard
        log = work / f"attempt-{number}.log"
        if how == "part write":
            nth = rng.randint(1, todo)
            code, output, _ = run(embed_args(model_dir, shards, out), log,
                                  write_kill={"pattern": ".part-", "nth": nth, "after_bytes": part_bytes // 2})
            killed = code == -signal.SIGKILL
            assert killed, f"{context}: part write {nth} of {todo} was not killed (exit {code}): {output[-3000:]}"
            torn = [n for n in temp_files(out) if n.startswith(".part-") and n not in temps_before]
            assert torn, f"{context}: the kill in part write {nth} left no torn temp file"
            records.append({"how": how, "killed": True, "in_part_write": True, "nth_part": nth,
                            "after_bytes": part_bytes // 2})
        else:
            expected_s = first_part_s + (seconds - first_part_s) * todo / parts_total
            delay = 0.0 if how == "start" else rng.uniform(0.0, 1.0) * expected_s
            attempt = start(embed_args(model_dir, shards, out), log)
            while attempt.alive() and time.monotonic() - attempt.started < delay:
                time.sleep(0.002)
            killed = attempt.alive()
            attempt.kill9()
            torn = [n for n in temp_files(out) if n.startswith(".part-") and n not in temps_before]
            records.append({"how": how, "delay_s": round(delay, 3), "killed": killed, "in_part_write": bool(torn)})
        now = read_embeddings(out) if out.exists() else {}  # every part on disk is valid parquet, keys once
        assert len(now) >= done, f"{context}: embeddings went from {done} to {len(now)}"
        records[-1].update(round=rounds, parts_to_do_before=todo, parts_on_disk=len(list(out.glob("part-*.parquet"))))

    worst = max(worst, finish_embedding(model_dir, shards, out, expected, work / "final.log", f"seed {seed}"))
    landed = [r for r in records if r["killed"]]
    return {"injected": len(landed), "survived": len(landed), "seed": seed, "keys": len(expected), "rounds": rounds,
            "kills_in_part_write": sum(1 for r in landed if r["in_part_write"]),
            "max_abs_diff": worst, "kills": records,
            "checked_against": "after a rerun (each round): every key of an uninterrupted run exactly once across the "
                               "parts, each part readable by pyarrow, embeddings within 1e-6 of the uninterrupted run, "
                               "manifest count equal, no temp files; after each kill: parts on disk readable, keys once"}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "write-kill":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} write-kill SPEC barlow-args...")
