"""Peak memory and speed of LoRA SFT on a 0.5B decoder on this machine: Qwen2.5-Coder-0.5B with gradient checkpointing.

Runs `tunelab train examples/symptom_sft.yaml` with `model.name=qwen2.5-coder-0.5b` (the bundled Q4_K_M GGUF,
dequantized to bf16/fp32 safetensors once and cached), LoRA r16 on every linear layer, gradient checkpointing on,
`train.max_steps` steps of batch 8, 16 eval rows scored before and after (no generation), in a process of its own,
and reads its peak RSS from the kernel (`os.wait4`) and its real tokens/s from metrics.json (the training loop only,
evaluation and saving excluded). `--compare` runs smollm2-135m the same way for scale.

    PYTHONPATH=src .venv/bin/python benchmarks/decoder_lora_memory.py [--steps 10] [--compare] [--json FILE]
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
RECIPE = ROOT / "examples" / "symptom_sft.yaml"
SETTINGS = ["train.gradient_checkpointing=true", "eval.generate.num_samples=0", "data.eval_size=16"]


def run(model: str, steps: int, output: Path) -> dict:
    """One `tunelab train` on `model`: its peak RSS, wall time and training-loop speed."""
    command = [sys.executable, "-m", "tunelab", "train", str(RECIPE), f"model.name={model}", *SETTINGS,
               f"train.max_steps={steps}", f"train.logging_steps={steps}", "--output", str(output), "--quiet"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    return {"model": model, "params": metrics["total_params"], "trainable": metrics["trainable_params"],
            "precision": metrics["precision"], "steps": steps, "peak_rss_gib": usage.ru_maxrss / 2 ** 20,
            "tokens_per_second": metrics["train_tokens_per_second"],
            "train_loop_seconds": metrics["train_loop_seconds"],
            "loss_before": metrics["before"]["loss"], "loss_after": metrics["after"]["loss"], "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="train.max_steps (default: %(default)s)")
    parser.add_argument("--compare", action="store_true", help="also run smollm2-135m the same way")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    models = ["qwen2.5-coder-0.5b", *(["smollm2-135m"] if args.compare else [])]
    with tempfile.TemporaryDirectory(prefix="tunelab-decoder-") as work:
        results = [run(model, args.steps, Path(work) / model) for model in models]
    print("| model | params (LoRA trains) | precision | steps × batch 8, grad. checkpointing | peak RSS "
          "| real tokens/s | eval loss before → after (16 rows) | wall |\n|---|---|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['model']} | {row['params'] / 1e6:.0f}M ({row['trainable'] / 1e6:.1f}M) | {row['precision']} | "
              f"{row['steps']} | {row['peak_rss_gib']:.2f} GiB | {row['tokens_per_second']:.0f} | "
              f"{row['loss_before']:.3f} → {row['loss_after']:.3f} | {row['wall_seconds']:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
