"""Kill `saeguard run` part-way through its training, run it again, and time the resume.

    python benchmarks/kill_resume_run.py --out runs/killed [--fraction 0.7] [-- RUN ARGS...]

Starts ``saeguard run --out OUT`` (plus any arguments after ``--``), SIGKILLs its whole process
group once ``OUT/sae/metrics.jsonl`` reports ``--fraction`` of the planned training steps, then
runs the same command again. Prints, as JSON: when the kill happened (seconds, step, total
steps), how long the re-run took, and the re-run's own step timings from ``run.json``, so the
overhead is ``resume_s`` minus the work left (the remaining steps at the measured step time,
plus eval, monitor and benchmark). ``OUT`` must be empty or missing; the log goes to OUT.log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def training_progress(out: Path) -> tuple[int, int] | None:
    """(last logged step, planned steps) once training has started, else None."""
    try:
        plan = json.loads((out / "run.json").read_text())["steps"]["plan"]["plan"]
        lines = (out / "sae" / "metrics.jsonl").read_text().splitlines()
        return (json.loads(lines[-1])["step"] if lines else 0), plan["train_tokens_final"] // 4096
    except (OSError, KeyError, ValueError, IndexError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder of the run (empty or new)")
    parser.add_argument("--fraction", type=float, default=0.7, help="of training steps, then kill")
    parser.add_argument("run_args", nargs="*", help="more `saeguard run` arguments, after --")
    args = parser.parse_args()
    out = Path(args.out)
    command = [sys.executable, "-m", "saeguard", "run", "--out", str(out), *args.run_args]
    with open(f"{out}.log", "w") as log:
        started = time.perf_counter()
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
        killed_at: tuple[int, int] | None = None
        while first.poll() is None:
            time.sleep(2)
            progress = training_progress(out)
            if progress and progress[0] >= args.fraction * progress[1]:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
                killed_at = progress
                break
        kill_s = time.perf_counter() - started
        if killed_at is None:
            sys.exit(f"the run ended (status {first.returncode}) before {args.fraction:.0%} of "
                     f"its training: nothing was killed; see {out}.log")  # fmt: skip
        restarted = time.perf_counter()
        second = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        resume_s = time.perf_counter() - restarted
    state = json.loads((out / "run.json").read_text())
    print(json.dumps({
        "killed_at_s": round(kill_s, 1),
        "killed_at_step": killed_at[0],
        "planned_steps": killed_at[1],
        "resume_s": round(resume_s, 1),
        "resume_status": second.returncode,
        "resumed_step_seconds": {k: round(v.get("seconds", 0.0), 1)
                                 for k, v in state["steps"].items()},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
