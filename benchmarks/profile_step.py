"""Where a training step's time goes: torch's profiler over tunelab's own training steps of an example job.

Runs `tunelab.api.train` on the job's recipe capped at a few steps (a small eval split, so scoring costs little),
and profiles optimizer steps `--skip` + 1 … `--skip` + `--steps` (forward, backward, optimizer, data loading)
from inside tunelab's Trainer. Prints the top operators by self CPU time.

Run from the repository root:
    PYTHONPATH=src .venv/bin/python benchmarks/profile_step.py sft      # SmolLM2-135M LoRA SFT, batch 4
    PYTHONPATH=src .venv/bin/python benchmarks/profile_step.py minilm   # MiniLM full classification, batch 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "sft": ("instructions_sft.yaml", ["model.max_length=512", "data.drop_long=true", "method.dropout=0",
                                      "train.gradient_checkpointing=false", "eval.generate.num_samples=0",
                                      "train.precision=bf16", "data.eval_size=8"]),
    "minilm": ("symptom_to_diagnosis.yaml", ["data.eval_size=22"]),
}


class StepProfiler(TrainerCallback):
    """Profiles optimizer steps skip+1 … skip+steps and keeps the profiler's table."""

    def __init__(self, skip: int, steps: int, rows: int) -> None:
        self.skip, self.steps, self.rows = skip, steps, rows
        self.profiler: torch.profiler.profile | None = None
        self.table = ""

    def on_step_begin(self, args, state, control, **kwargs):
        """Start profiling when the first profiled step begins."""
        if state.global_step == self.skip and self.profiler is None:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        """Stop after the last profiled step and keep the top operators by self CPU time."""
        if self.profiler is not None and not self.table and state.global_step == self.skip + self.steps:
            self.profiler.__exit__(None, None, None)
            self.table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.rows)


def main(argv: list[str] | None = None) -> int:
    """Train the job a few steps under the profiler and print its top operators."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--skip", type=int, default=2, help="optimizer steps to run before profiling")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps to profile")
    parser.add_argument("--rows", type=int, default=15, help="operators to print")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. train.precision=fp32")
    args = parser.parse_args(argv)

    from tunelab import api
    from tunelab.recipe import load_recipe
    from tunelab.trainer import TunelabMixin

    profiler = StepProfiler(args.skip, args.steps, args.rows)
    init = TunelabMixin.__init__

    def profiled_init(self, *a, **k):
        init(self, *a, **k)
        self.add_callback(profiler)

    TunelabMixin.__init__ = profiled_init
    recipe_file, overrides = JOBS[args.job]
    steps = args.skip + args.steps
    with tempfile.TemporaryDirectory(prefix="tunelab-profile-") as folder:
        recipe = load_recipe(ROOT / "examples" / recipe_file,
                             [*overrides, f"train.max_steps={steps}", *args.overrides])
        api.train(recipe, str(Path(folder) / "run"))
    print(f"\n{args.job}: optimizer steps {args.skip + 1}–{steps}, {torch.get_num_threads()} threads")
    print(profiler.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
