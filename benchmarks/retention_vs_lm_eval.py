"""tunelab's retention scorer against lm-evaluation-harness, on the same local probe files and the same model.

    .venv/bin/python -m pip install lm_eval      # for this benchmark only; not a tunelab dependency
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/retention_vs_lm_eval.py [--model smollm2-135m]
        [--piqa-size N] [--wikitext-docs N] [--max-length 2048] [--piqa-batch 16] [--wikitext-batch 1]
        [--timing-piqa 200,500] [--timing-wikitext 5,10] [--json benchmarks/results/retention_vs_lm_eval.json]

Both sides score PIQA's validation split (acc, acc_norm) and WikiText-2's test split (word perplexity, byte
perplexity, bits per byte) with the model in fp32 and a fixed batch size, and the script prints them side by side
with the differences and each side's wall time. The acceptance target: within 0.5 points of accuracy and 1% of
perplexity.

The harness runs fully offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) on its own task definitions, `piqa.yaml` and
`wikitext.yaml` as it ships them (prompt, choices, detokenizer, word and byte counts), with only the dataset
pointed at local files: PIQA's jsonl joined with its labels file, and WikiText's test.txt cut into articles by the
same rule as `EleutherAI/wikitext_document_level`'s loading script (written out again here, not taken from tunelab,
so the two sides share nothing but the files). The HF backend gets the model folder path and `max_length`, which
sets its rolling window (its default is the model's context, 8192 tokens for SmolLM2, too slow on a CPU).

`--timing-piqa` / `--timing-wikitext` also time tunelab's scorer alone at those sizes (PIQA rows drawn with the
probe's seed, WikiText's first documents) with the 95% interval of acc at each, for choosing a default size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tunelab.evaluation import retention  # noqa: E402
from tunelab.evaluation.uncertainty import mean_interval  # noqa: E402
from tunelab.models.loading import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACC_TOLERANCE = 0.005  # half a point
PPL_TOLERANCE = 0.01  # 1%


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or folder (default: %(default)s)")
    parser.add_argument("--piqa-size", type=int, help="PIQA rows, drawn with the probe's seed (default: all 1,838)")
    parser.add_argument("--wikitext-docs", type=int, help="WikiText's first N articles (default: all 62)")
    parser.add_argument("--max-length", type=int, default=2048, help="rolling window, tokens (default: %(default)s)")
    parser.add_argument("--piqa-batch", type=int, default=16, help="sequences per forward pass (default: 16)")
    parser.add_argument("--wikitext-batch", type=int, default=1, help="windows per forward pass (default: 1)")
    parser.add_argument("--timing-piqa", default="", help="extra PIQA sizes to time tunelab's scorer at, e.g. 200,500")
    parser.add_argument("--timing-wikitext", default="", help="extra WikiText article counts to time, e.g. 5,10")
    parser.add_argument("--skip-lm-eval", action="store_true", help="tunelab's side only")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    location = resolve_model(args.model).location
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    items = retention.load_piqa(size=args.piqa_size)
    docs = retention.load_wikitext(docs=args.wikitext_docs)
    print(f"model {args.model} ({location}); PIQA {len(items)} rows; WikiText {len(docs)} articles; "
          f"window {args.max_length}; torch threads {torch.get_num_threads()}", flush=True)

    ours, our_seconds = score_with_tunelab(model, tokenizer, items, docs, args)
    print(f"tunelab: {our_seconds['piqa']:.0f} s PIQA, {our_seconds['wikitext']:.0f} s WikiText "
          f"({ours['wikitext_tokens']} tokens, {ours['wikitext_windows']} windows; load {load()})", flush=True)
    result = {"model": args.model, "location": location, "piqa_rows": len(items), "wikitext_docs": len(docs),
              "max_length": args.max_length, "piqa_batch": args.piqa_batch, "wikitext_batch": args.wikitext_batch,
              "torch_threads": torch.get_num_threads(), "tunelab": ours, "tunelab_seconds": our_seconds}
    if not args.skip_lm_eval:
        del model  # the harness loads its own copy
        theirs, their_seconds = score_with_lm_eval(location, [item.row for item in items], len(docs), args)
        result.update(lm_eval=theirs, lm_eval_seconds=their_seconds, lm_eval_version=lm_eval_version())
        result["rows"] = print_table(ours, theirs, our_seconds, their_seconds)
        result["agrees"] = all(row["within_tolerance"] for row in result["rows"])
        print(f"agreement within {ACC_TOLERANCE * 100:.1f} points / {PPL_TOLERANCE:.0%}: {result['agrees']}")
    if args.timing_piqa or args.timing_wikitext:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
        result["timings"] = time_sizes(model, tokenizer, args, ours)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def score_with_tunelab(model, tokenizer, items, docs, args) -> tuple[dict, dict]:
    start = time.perf_counter()
    piqa = retention.score_multiple_choice(model, tokenizer, items, batch_size=args.piqa_batch)
    middle = time.perf_counter()
    wikitext = retention.score_rolling_perplexity(model, tokenizer, docs, max_length=args.max_length,
                                                  batch_size=args.wikitext_batch)
    end = time.perf_counter()
    scores = {"acc": piqa["acc"], "acc_norm": piqa["acc_norm"], "word_perplexity": wikitext["word_perplexity"],
              "byte_perplexity": wikitext["byte_perplexity"], "bits_per_byte": wikitext["bits_per_byte"],
              "piqa_per_row": piqa["per_row"]["acc"], "wikitext_windows": wikitext["windows"],
              "wikitext_tokens": wikitext["tokens"]}
    return scores, {"piqa": round(middle - start, 1), "wikitext": round(end - middle, 1), "load_after": load()}


def load() -> float:
    """The machine's 1-minute load average: the cores are shared, so a wall time is read beside it."""
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------- the harness, on local files


def wikitext_document_level_pages(path: Path) -> list[str]:
    """`EleutherAI/wikitext_document_level`'s `_generate_examples`: a page per level-one title, the last kept."""
    pages, lines = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        flat = line.replace("= = =", "===").replace("= =", "==").strip()
        if flat.startswith("= ") and flat.strip().endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def harness_task(name: str, local_name: str, data_file: Path, split: str) -> dict:
    """The harness's own task YAML, with its dataset replaced by a local jsonl file."""
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / name

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):  # `!function module.name`, resolved beside the YAML as the harness does
        module_name, attribute = loader.construct_scalar(node).rsplit(".", 1)
        sys.path.insert(0, str(folder))
        try:
            return getattr(__import__(module_name), attribute)
        finally:
            sys.path.remove(str(folder))

    Loader.add_constructor("!function", function)
    config = yaml.load((folder / f"{name}.yaml").read_text(), Loader=Loader)
    config.update(task=local_name, dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {split: str(data_file)}}, training_split=None,
                  validation_split=split if split == "validation" else None,
                  test_split=split if split == "test" else None)
    return config


def score_with_lm_eval(location: str, piqa_rows: list[int], wikitext_docs: int, args) -> tuple[dict, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    general = retention.find_probe(retention.PIQA_FOLDER).parent
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        questions = (general / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
        labels = (general / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()
        with open(folder / "piqa.jsonl", "w", encoding="utf-8") as out:
            for row in piqa_rows:
                out.write(json.dumps({**json.loads(questions[row]), "label": int(labels[row])}) + "\n")
        pages = wikitext_document_level_pages(general / "wikitext-2" / "test.txt")[:wikitext_docs]
        with open(folder / "wikitext.jsonl", "w", encoding="utf-8") as out:
            for page in pages:
                out.write(json.dumps({"page": page}) + "\n")
        piqa_task = harness_task("piqa", "piqa_local", folder / "piqa.jsonl", "validation")
        wikitext_task = harness_task("wikitext", "wikitext_local", folder / "wikitext.jsonl", "test")

        scores, seconds = {}, {}
        for task, batch in ((piqa_task, args.piqa_batch), (wikitext_task, args.wikitext_batch)):
            lm = HFLM(pretrained=location, dtype="float32", batch_size=batch, max_length=args.max_length,
                      device="cpu")
            start = time.perf_counter()
            output = simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0, log_samples=False,
                                     cache_requests=False)
            seconds[task["task"].removesuffix("_local")] = round(time.perf_counter() - start, 1)
            seconds[f"load_after_{task['task'].removesuffix('_local')}"] = load()
            for key, value in output["results"][task["task"]].items():
                metric = key.split(",")[0]
                if isinstance(value, float) and not metric.endswith("_stderr"):
                    scores[metric] = value
    return scores, seconds


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# ------------------------------------------------------------------------------------------------------- report


METRICS = (("acc", "PIQA acc"), ("acc_norm", "PIQA acc_norm"), ("word_perplexity", "WikiText word ppl"),
           ("byte_perplexity", "WikiText byte ppl"), ("bits_per_byte", "WikiText bits/byte"))


def print_table(ours: dict, theirs: dict, our_seconds: dict, their_seconds: dict) -> list[dict]:
    rows = []
    print("\n| metric | tunelab | lm-eval | difference | within target |\n|---|---|---|---|---|")
    for key, label in METRICS:
        mine, reference = ours[key], theirs[key]
        if key.startswith("acc"):
            difference, ok, shown = mine - reference, abs(mine - reference) <= ACC_TOLERANCE, \
                f"{(mine - reference) * 100:+.2f} points"
        else:
            difference = mine / reference - 1
            ok, shown = abs(difference) <= PPL_TOLERANCE, f"{difference:+.3%}"
        rows.append({"metric": key, "tunelab": mine, "lm_eval": reference, "difference": difference,
                     "within_tolerance": bool(ok)})
        print(f"| {label} | {mine:.4f} | {reference:.4f} | {shown} | {'yes' if ok else 'NO'} |")
    for probe in ("piqa", "wikitext"):
        print(f"| wall time {probe} | {our_seconds[probe]:.0f} s | {their_seconds[probe]:.0f} s | | |")
    return rows


def time_sizes(model, tokenizer, args, ours: dict) -> list[dict]:
    """tunelab's wall time and the 95% interval of acc at each requested size."""
    found = []
    print("\n| probe | size | tunelab wall s | acc [95% interval] | interval width |\n|---|---|---|---|---|")
    for size in [int(s) for s in args.timing_piqa.split(",") if s]:
        items = retention.load_piqa(size=size)
        start = time.perf_counter()
        score = retention.score_multiple_choice(model, tokenizer, items, batch_size=args.piqa_batch)
        seconds = time.perf_counter() - start
        bounds = mean_interval(score["per_row"]["acc"])
        found.append({"probe": "piqa", "size": size, "seconds": round(seconds, 1), "acc": score["acc"], **bounds,
                      "width": round(bounds["high"] - bounds["low"], 4)})
        print(f"| PIQA | {size} | {seconds:.0f} | {score['acc']:.3f} [{bounds['low']:.3f}, {bounds['high']:.3f}] "
              f"| {bounds['high'] - bounds['low']:.3f} |", flush=True)
    for count in [int(s) for s in args.timing_wikitext.split(",") if s]:
        docs = retention.load_wikitext(docs=count)
        start = time.perf_counter()
        score = retention.score_rolling_perplexity(model, tokenizer, docs, max_length=args.max_length,
                                                   batch_size=args.wikitext_batch)
        seconds = time.perf_counter() - start
        tokens = score["tokens"]
        found.append({"probe": "wikitext", "size": count, "seconds": round(seconds, 1), "tokens": tokens,
                      "word_perplexity": score["word_perplexity"]})
        print(f"| WikiText | {count} articles, {tokens} tokens | {seconds:.0f} | word ppl "
              f"{score['word_perplexity']:.2f} | |", flush=True)
    full = np.asarray(ours["piqa_per_row"])
    bounds = mean_interval(full)
    print(f"(the main run: PIQA {len(full)} rows, acc {full.mean():.3f} [{bounds['low']:.3f}, {bounds['high']:.3f}], "
          f"width {bounds['high'] - bounds['low']:.3f})")
    return found


if __name__ == "__main__":
    main()
