"""What a `tunelab tune` study costs against one default run of the same recipe, side by side in one run.

Runs `tunelab train RECIPE` once (the default run a user would start with), then `tunelab tune RECIPE --trials N`
on the same machine, one after the other, each in a process of its own, and prints one JSON object: both wall times
and their ratio, the trials that finished / were pruned / failed, the epochs the trials trained against the epochs N
unpruned trials would have, and the study's final comparison (winner against your recipe on the reported split,
with the paired interval). The machine's load average is printed beside the times: a shared machine slows both.

    PYTHONPATH=src TUNELAB_DATA_PATH=../shared/data .venv/bin/python benchmarks/tune_cost.py \
        examples/symptom_to_diagnosis_lora.yaml --trials 16 [--workers 2] [--work /tmp/tune-cost] [key=value …]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def timed(command: list[str], log: Path) -> float:
    """Run a tunelab command (its output to `log`); its wall time in seconds."""
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "tunelab", *command], stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--metric")
    parser.add_argument("--refit", action="store_true")
    parser.add_argument("--work", default="/tmp/tune-cost")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()  # overrides may come after the options
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load = [os.getloadavg()[0]]
    default = timed(["train", args.recipe, *args.overrides, "--output", str(work / "default")], work / "default.log")
    load.append(os.getloadavg()[0])
    extra = [*(["--metric", args.metric] if args.metric else []), *(["--refit"] if args.refit else [])]
    tune = timed(["tune", args.recipe, *args.overrides, "--trials", str(args.trials), "--workers", str(args.workers),
                  "--output", str(work / "study"), *extra], work / "tune.log")
    load.append(os.getloadavg()[0])
    study = json.loads((work / "study" / "study.json").read_text())
    default_metrics = json.loads((work / "default" / "metrics.json").read_text())
    epochs_run = sum(trial["last_epoch"] or 0 for trial in study["trials"])
    recipe_epochs = yaml.safe_load((work / "default" / "recipe.yaml").read_text())["train"]["epochs"]
    epochs_unpruned = sum(trial["values"].get("train.epochs", recipe_epochs) for trial in study["trials"])
    print(json.dumps({
        "recipe": args.recipe, "trials": args.trials, "workers": args.workers,
        "default_run_seconds": round(default, 1), "tune_seconds": round(tune, 1), "ratio": round(tune / default, 2),
        "load_average_1min": [round(value, 2) for value in load],
        "counts": study["counts"], "trial_epochs_trained": epochs_run, "trial_epochs_unpruned": epochs_unpruned,
        "default_run_after": {key: default_metrics["after"].get(key) for key in ("accuracy", "exact_match", "loss")
                              if key in default_metrics["after"]},
        "final": study["final"]}, indent=2))


if __name__ == "__main__":
    main()
