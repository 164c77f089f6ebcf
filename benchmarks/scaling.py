"""Scaling on one machine: the same recipe on 1 process × N threads against N processes × 1 thread (DDP, gloo).

Each job runs twice, one after the other, with the same recipe, seed and global batch: `tunelab train` in one
process with OMP_NUM_THREADS=N, then `tunelab train --nproc N` with one thread per process. Both use the machine's N
cores; the question is whether splitting the batch over processes (and all-reducing the gradients each step)
beats splitting each matmul over threads. The steps are capped (train.max_steps, inside the first epoch, so every
step holds a full global batch) and the table reads the runs' metrics.json:

- samples/s: optimizer steps × global batch / the training loop's seconds (evaluation and saving excluded);
- communication: DDP's own timers (rank 0), the gradient all-reduce from the first bucket sent to the last
  received, and the part of it the backward pass did not hide ("exposed");
- wall: the whole `tunelab train` process, loading and before/after scoring included.

Run from the repository root (the jobs need the bundled models and ../shared/data):
    PYTHONPATH=src .venv/bin/python benchmarks/scaling.py [--jobs minilm,smollm2] [--steps 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# job → (recipe, overrides): fp32 so that both ways run the same arithmetic; no per-epoch evaluation
JOBS = {
    "minilm": (ROOT / "examples" / "symptom_to_diagnosis.yaml", ["train.precision=fp32"]),
    "smollm2": (ROOT / "examples" / "symptom_sft.yaml",
                ["train.precision=fp32", "eval.generate.num_samples=0", "data.eval_size=32"]),
}


def run(recipe: Path, overrides: list[str], output: Path, processes: int, threads: int) -> dict:
    """One `tunelab train` (through `--nproc` when processes > 1): its metrics and its wall seconds."""
    launch = ["--nproc", str(processes)] if processes > 1 else []
    command = [sys.executable, "-m", "tunelab", "train", str(recipe), *overrides, "--output", str(output),
               "--quiet", *launch]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    steps = max(entry["step"] for entry in metrics["history"] if "step" in entry)
    seconds = metrics["train_loop_seconds"]
    return {"processes": processes, "threads": threads, "steps": steps, "global_batch": metrics["global_batch_size"],
            "train_loop_seconds": seconds, "samples_per_second": steps * metrics["global_batch_size"] / seconds,
            "communication_seconds": metrics.get("communication_seconds"),
            "communication_exposed_seconds": metrics.get("communication_exposed_seconds"),
            "first_loss": next(entry["loss"] for entry in metrics["history"] if "loss" in entry),
            "wall_seconds": wall}


def table(results: dict[str, list[dict]]) -> str:
    """One row per job and way, with the processes' ratio to one process."""
    lines = ["| job | way | steps × global batch | samples/s | ratio | all-reduce (exposed) | step-1 loss | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for job, (single, multi) in results.items():
        for way in (single, multi):
            comm = "–" if way["communication_seconds"] is None else (
                f"{way['communication_seconds']:.1f} s ({way['communication_exposed_seconds']:.1f} s), "
                f"{way['communication_seconds'] / way['train_loop_seconds']:.0%} of the loop")
            processes, threads = way["processes"], way["threads"]
            lines.append(f"| {job} | {processes} process{'es' * (processes > 1)} × {threads} "
                         f"thread{'s' * (threads > 1)} | {way['steps']} × "
                         f"{way['global_batch']} | {way['samples_per_second']:.2f} | "
                         f"{way['samples_per_second'] / single['samples_per_second']:.2f}x | {comm} | "
                         f"{way['first_loss']:.4f} | {way['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (train.max_steps)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="N: processes, and threads of one")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-scaling-") as work:
        for job in args.jobs.split(","):
            recipe, overrides = JOBS[job]
            overrides = [*overrides, f"train.max_steps={args.steps}", f"train.logging_steps={args.steps}"]
            results[job] = [run(recipe, overrides, Path(work) / f"{job}-{processes}", processes, threads)
                            for processes, threads in ((1, args.cores), (args.cores, 1))]
            print(f"{job}: done", file=sys.stderr)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
