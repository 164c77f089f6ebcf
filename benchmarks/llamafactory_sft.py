"""tunelab against LLaMA-Factory 0.9.5 on the SFT job, at equal settings, one after the other on this machine.

Both train SmolLM2-135M-Instruct (the bundled weights) with LoRA r16 alpha 32 dropout 0 on every linear layer, on
the same Self-Instruct seed rows (those whose prompt fits 512 tokens, cut at 512), 2 epochs, batch 4, lr 2e-4
linear with 10% warm-up, weight decay 0.01, seed 42, bf16 autocast over a bf16 frozen base, gradient checkpointing
off on both; then both score the eval loss on the 252 held-out instructions (response tokens only).

LLaMA-Factory runs in its own venv (created on first use under ~/.cache/tunelab-bench/llamafactory, CPU torch
pinned first so that it pulls no CUDA build; torchvision/torchaudio are installed but never imported by a text SFT).
Its `llamafactory-cli train` is run through a small wrapper that calls the same `run_exp` and adds the counters
tunelab's TrainingMeter keeps (rows, real and padded tokens, training-loop seconds without eval and saving).

Run from the repository root:
    PYTHONPATH=src .venv/bin/python benchmarks/llamafactory_sft.py [--quick] [--json out.json]
--quick trains 24 rows for 1 epoch and scores 24 eval rows (a check that everything runs, not a measurement).
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
VENV = Path.home() / ".cache" / "tunelab-bench" / "llamafactory"
LLAMAFACTORY = "llamafactory==0.9.5"
TORCH = "torch==2.13.0"  # the CPU build this project pins (PyPI's cpu wheel / the PyTorch CPU index)
RECIPE = ROOT / "examples" / "instructions_sft.yaml"
SETTINGS = ["model.max_length=512", "data.drop_long=true", "train.gradient_checkpointing=false",
            "eval.generate.num_samples=0", "method.dropout=0", "method.alpha=32", "train.learning_rate=2e-4",
            "train.lr_scheduler=linear", "train.warmup_ratio=0.1", "train.weight_decay=0.01", "train.seed=42",
            "train.precision=bf16"]
QUICK = ["data.train_size=24", "data.eval_size=24", "train.epochs=1"]

# Runs inside LLaMA-Factory's venv: its `train` entry point plus TrainingMeter's counters, written as JSON.
WRAPPER = '''
import json, resource, sys, time
from transformers import Trainer, TrainerCallback
from llamafactory.train.tuner import run_exp

counts = {"samples": 0, "tokens": 0, "padded_tokens": 0, "train_seconds": 0.0}
step = Trainer.training_step

def counted_step(self, model, inputs, *args, **kwargs):
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    counts["samples"] += ids.shape[0]
    counts["padded_tokens"] += ids.numel()
    counts["tokens"] += int((mask != 0).sum()) if mask is not None and mask.dim() == 2 else ids.numel()
    return step(self, model, inputs, *args, **kwargs)

Trainer.training_step = counted_step

class Meter(TrainerCallback):
    mark = None
    def on_train_begin(self, *a, **k): self.mark = time.perf_counter()
    def on_step_end(self, *a, **k):
        now = time.perf_counter(); counts["train_seconds"] += now - self.mark; self.mark = now
    def on_evaluate(self, *a, **k): self.mark = time.perf_counter()
    def on_save(self, *a, **k): self.mark = time.perf_counter()

run_exp(args=json.load(open(sys.argv[1])), callbacks=[Meter()])
counts["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
json.dump(counts, open(sys.argv[2], "w"))
'''


def ensure_llamafactory(venv: Path) -> Path:
    """LLaMA-Factory's own venv (created once): CPU torch first, then LLaMA-Factory held to that torch."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llamafactory.train.tuner"]).returncode == 0:
        return python
    print(f"llamafactory_sft: installing {LLAMAFACTORY} into {venv} (once; several minutes)", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")  # keeps torchvision/torchaudio from replacing the CPU torch
    subprocess.run([*pip, "-c", str(constraints), LLAMAFACTORY], check=True)
    neutralise_vision_audio(python)
    return python


def neutralise_vision_audio(python: Path) -> None:
    """PyPI's torchvision/torchaudio do not load against the CPU torch (torchvision::nms missing, _torchaudio.so
    built for another torch). A text SFT needs neither: remove both, and leave an empty `torchaudio` module for the
    one unconditional `import torchaudio` in llamafactory/data/mm_plugin.py."""
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "torchvision", "torchaudio"], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stub = Path(site) / "torchaudio"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text('"""Empty stand-in (tunelab benchmark): text SFT never uses torchaudio."""\n')


def tunelab_rows(overrides: list[str]):
    """The model folder and the exact train / eval rows tunelab trains and scores under these overrides."""
    from tunelab.api import check_recipe
    from tunelab.recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides)
    data, source = check_recipe(recipe)  # drops the rows whose prompt fills 512 tokens, as tunelab does
    return recipe, source.location, data


def write_dataset(folder: Path, data) -> None:
    """The rows as LLaMA-Factory ShareGPT-style files plus their dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    info = {}
    for name, split in (("train", data.train), ("eval", data.eval)):
        rows = [{"messages": [{"role": m["role"], "content": m["content"]} for m in row]} for row in split["messages"]]
        (folder / f"{name}.json").write_text(json.dumps(rows))
        info[name] = {"file_name": f"{name}.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                      "tags": tags}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))


def llamafactory_config(recipe, location: str, dataset_dir: Path, output: Path, train: bool) -> dict:
    """LLaMA-Factory's SFT config with the recipe's settings (train: the training run; else the eval-only run)."""
    common = {"model_name_or_path": location, "template": "smollm2", "stage": "sft", "finetuning_type": "lora",
              "dataset_dir": str(dataset_dir), "cutoff_len": recipe.model.max_length, "output_dir": str(output),
              "bf16": True, "use_cpu": True, "report_to": "none", "seed": recipe.train.seed, "overwrite_cache": True,
              "per_device_eval_batch_size": recipe.eval.batch_size, "disable_gradient_checkpointing": True,
              "dataloader_num_workers": 0}
    if not train:
        return {**common, "do_train": False, "do_eval": True, "eval_dataset": "eval",
                "adapter_name_or_path": str(output)}
    return {**common, "do_train": True, "dataset": "train", "lora_rank": recipe.method.r,
            "lora_alpha": recipe.method.alpha, "lora_dropout": recipe.method.dropout, "lora_target": "all",
            "num_train_epochs": recipe.train.epochs, "per_device_train_batch_size": recipe.train.batch_size,
            "gradient_accumulation_steps": recipe.train.grad_accum, "learning_rate": recipe.train.learning_rate,
            "lr_scheduler_type": recipe.train.lr_scheduler, "warmup_ratio": recipe.train.warmup_ratio,
            "weight_decay": recipe.train.weight_decay, "logging_steps": 10, "save_strategy": "no",
            "plot_loss": False}


def timed(command: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run a command to completion: (wall seconds, peak RSS GiB of it and its children), its output to `log`."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command[:3])} … failed; last lines of {log}:\n{tail}")
    return wall, usage.ru_maxrss / 2 ** 20


def run_llamafactory(python: Path, recipe, location: str, work: Path) -> dict:
    """LLaMA-Factory's training command, then its eval-only command on the eval split."""
    dataset_dir, output = work / "lf-data", work / "lf-out"
    (work / "wrapper.py").write_text(WRAPPER)
    figures = {}
    for train in (True, False):
        config = work / f"lf-{'train' if train else 'eval'}.json"
        config.write_text(json.dumps(llamafactory_config(recipe, location, dataset_dir, output, train)))
        counts = work / f"lf-counts-{train}.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "PYTHONPATH": "",
               "TOKENIZERS_PARALLELISM": "false"}
        wall, rss = timed([str(python), str(work / "wrapper.py"), str(config), str(counts)],
                          work / f"lf-{'train' if train else 'eval'}.log", env)
        if train:
            figures.update(json.loads(counts.read_text()), wall=wall, peak_rss_gib=rss)
        else:
            scores = json.loads((output / "eval_results.json").read_text())
            figures.update(eval_wall=wall, eval_loss=scores["eval_loss"])
    return figures


def run_tunelab(overrides: list[str], work: Path) -> dict:
    """`tunelab train` on the recipe (its before/after scoring included), timed as a whole process."""
    run = work / "tunelab-run"
    command = [sys.executable, "-m", "tunelab", "train", str(RECIPE), *overrides, "--output", str(run), "--quiet"]
    wall, rss = timed(command, work / "tunelab.log", {**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = json.loads((run / "metrics.json").read_text())
    return {"samples": metrics["train_loop_samples"], "tokens": metrics["train_tokens"],
            "padded_tokens": metrics["train_padded_tokens"], "train_seconds": metrics["train_loop_seconds"],
            "eval_loss": metrics["after"]["loss"], "wall": wall, "peak_rss_gib": rss}


def common_losses(recipe, location: str, data, adapters: dict[str, Path]) -> dict[str, float]:
    """One scorer for every model: the mean token cross-entropy over the response tokens of the eval rows, encoded
    as tunelab encodes them (SmolLM2's chat template, prompt masked), one row at a time under bf16 autocast. Each
    way reports its own eval loss its own way (LLaMA-Factory: the mean of per-batch means, labels ending with the
    template's newline after <|im_end|>; tunelab: token-weighted), so their own figures are not like for like;
    these are. "base" is the untrained model."""
    import torch
    from peft import PeftModel

    from tunelab.data.sft_encoding import IGNORE_INDEX, encode_split, prompt_format
    from tunelab.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(location)
    fmt = prompt_format(tokenizer, recipe.data.chat_template, data.format, recipe.model.name)
    rows = encode_split(fmt, data.eval, recipe.train.completion_only_loss, recipe.model.max_length)
    losses = {}
    for name, adapter in {"base": None, **adapters}.items():
        model = load_causal_lm(location).to(torch.bfloat16)
        model = (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()
        total, count = 0.0, 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for row in rows:
                ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
                logits = model(input_ids=ids).logits[0, :-1].float()
                target = labels[0, 1:]
                total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                                                 reduction="sum"))
                count += int((target != IGNORE_INDEX).sum())
        losses[name] = total / count
        print(f"llamafactory_sft: common scorer: {name} {losses[name]:.4f}", flush=True)
    return losses


def peaks() -> dict:
    """bf16 and fp32 2048² matmul peaks (FLOP/s) on all threads and on one."""
    import torch

    from tunelab.bench import measure_matmul_peak

    figures = {}
    for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
        torch.set_num_threads(threads)
        for dtype in ("bf16", "fp32"):
            figures[f"{dtype}_{threads}t"] = measure_matmul_peak(dtype, 2048, 1)
    torch.set_num_threads(os.cpu_count() or 1)
    return figures


def table(lf: dict, ours: dict, flops_per_token: int, peak: float, common: dict[str, float]) -> str:
    """The issue's table: LLaMA-Factory, tunelab and their ratio."""
    def derived(way: dict) -> dict:
        seconds = way["train_seconds"]
        return {"sps": way["samples"] / seconds, "tps": way["tokens"] / seconds,
                "mfu": flops_per_token * way["tokens"] / seconds / peak}

    a, b = derived(lf), derived(ours)
    lines = ["| | LLaMA-Factory 0.9.5 | tunelab | ratio |", "|---|---|---|---|",
             f"| train samples/s | {a['sps']:.3f} | {b['sps']:.3f} | {b['sps'] / a['sps']:.2f}x |",
             f"| real tokens/s | {a['tps']:.1f} | {b['tps']:.1f} | {b['tps'] / a['tps']:.2f}x |",
             f"| tokens processed (incl. padding) | {lf['padded_tokens']:,} | {ours['padded_tokens']:,} | "
             f"{1 - ours['padded_tokens'] / lf['padded_tokens']:.0%} fewer |",
             f"| peak RSS | {lf['peak_rss_gib']:.2f} GiB | {ours['peak_rss_gib']:.2f} GiB | "
             f"{ours['peak_rss_gib'] / lf['peak_rss_gib']:.2f}x |",
             f"| whole process, wall | {lf['wall']:.0f} s (train) + {lf['eval_wall']:.0f} s (eval) | "
             f"{ours['wall']:.0f} s (all) | {ours['wall'] / lf['wall']:.2f}x of LF's train command |",
             f"| eval loss, each way's own scorer | {lf['eval_loss']:.4f} | {ours['eval_loss']:.4f} | |",
             f"| eval loss, one scorer for both (untrained: {common['base']:.4f}) | {common['lf']:.4f} | "
             f"{common['tunelab']:.4f} | {common['tunelab'] - common['lf']:+.4f} |",
             f"| MFU (bf16 peak) | {a['mfu']:.1%} | {b['mfu']:.1%} | |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Install (once), export the rows, run LLaMA-Factory then tunelab, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 rows, 1 epoch, 24 eval rows: a check, not a figure")
    parser.add_argument("--venv", type=Path, default=VENV, help="LLaMA-Factory's venv (created when missing)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--order", choices=["lf-first", "tunelab-first"], default="lf-first")
    parser.add_argument("--only", choices=["lf", "tunelab"], help="run one way alone (a probe: no table)")
    args = parser.parse_args(argv)
    python = ensure_llamafactory(args.venv)
    overrides = SETTINGS + (QUICK if args.quick else [])
    recipe, location, data = tunelab_rows(overrides)
    from tunelab.bench import flops_per_token, model_size

    per_token = flops_per_token(model_size(location, None)[1], "lora")
    load = os.getloadavg()
    measured = peaks()
    print(f"llamafactory_sft: {len(data.train)} train rows, {len(data.eval)} eval rows; load {load[0]:.2f}; "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in measured.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="tunelab-lf-") as folder:
        work = Path(folder)
        write_dataset(work / "lf-data", data)
        ways = {}
        order = ["lf", "tunelab"] if args.order == "lf-first" else ["tunelab", "lf"]
        order = [args.only] if args.only else order
        for way in order:
            print(f"llamafactory_sft: running {way} ...", flush=True)
            ways[way] = run_llamafactory(python, recipe, location, work) if way == "lf" else \
                run_tunelab(overrides, work)
            print(f"llamafactory_sft: {way}: {json.dumps(ways[way])}", flush=True)
        adapters = {"lf": work / "lf-out", "tunelab": work / "tunelab-run" / "model"}
        common = common_losses(recipe, location, data, {way: adapters[way] for way in ways})
    if args.only:
        return 0
    peak = measured[f"bf16_{os.cpu_count() or 1}t"]
    print(f"\nload average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}; bf16 peak {peak / 1e9:.0f} "
          f"GFLOP/s ({os.cpu_count()} threads); MFU at 4·N FLOPs per real token")
    print(table(ways["lf"], ways["tunelab"], per_token, peak, common))
    if args.json:
        args.json.write_text(json.dumps({"peaks": measured, "load": load, "quick": args.quick, "ways": ways,
                                         "common_eval_loss": common, "flops_per_token": per_token}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
