"""Peak memory of streamed continued pre-training (data.streaming) as the corpus grows: 10 MB against 1 GB.

    PYTHONPATH=src .venv/bin/python benchmarks/streaming_rss.py [--workdir DIR] [--sizes 10MB,1GB] [--skip-1gb]
        [--max-steps 20] [--eval-size 200] [--repeats 1] [--no-contrast] [--read-mb 200] [--keep] [--json FILE]

Writes corpora of the tweets of tweet_sentiment_extraction's train split (every pass over them in a new seeded
order, each tweet tagged with its pass, so no two lines are the same) to `--workdir` (default: a temporary folder
under /tmp), line by line, never holding a corpus in memory; beside each, the split's test tweets as test.jsonl.
Then it runs `python -m tunelab train examples/tweets_pretrain.yaml` (SmolLM2-135M LoRA, 128-token blocks, batch 8)
on each with `data.streaming=true` and the same `train.max_steps`, one run after the other, each in its own
process, and reads that process's peak RSS from the kernel (`os.wait4`: the child's own ru_maxrss). With
contrast (the default) the smallest corpus also trains read whole, without streaming. --repeats N runs the whole
plan N times over (in turn, so slow spells of a shared machine fall on every setting): the peak of one process
varies by a few tenths of a GiB from run to run on the same data (how the allocator's heap happens to fill).
Prints a markdown table, one row per setting with every run's peak; the ratio column divides the mean peak by the
smallest streamed corpus's. Corpora are deleted at the end unless --keep.

A capped run reads little of a large file (20 steps of 8 × 128-token blocks are ~1,000 tweets, plus the 10,000-row
shuffle buffer: the json reader's first 10 MB chunk), so the script also reads --read-mb MB of the largest corpus
through tunelab's streamed data path without a model (read, normalise, shuffle buffer, tokenize) in a process of
its own, and reports its RSS after the first 10 MB and at the end: flat if nothing accumulates while reading.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "tweets_pretrain.yaml"
UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where corpora and run folders go (default: a new folder under /tmp)")
    parser.add_argument("--sizes", default="10MB,1GB", help="corpus sizes, smallest first (default: %(default)s)")
    parser.add_argument("--skip-1gb", action="store_true", help="leave out sizes of 1 GB and more (a quick try)")
    parser.add_argument("--max-steps", type=int, default=20, help="train.max_steps of every run (default: 20)")
    parser.add_argument("--eval-size", type=int, default=200, help="test tweets scored before and after (default: "
                                                                   "%(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every setting (default: 1)")
    parser.add_argument("--no-contrast", action="store_true", help="skip the smallest corpus read whole")
    parser.add_argument("--read-mb", type=int, default=200, help="MB of the largest corpus to read through the data "
                                                                 "path without a model (0: skip; default: 200)")
    parser.add_argument("--read-stream", help=argparse.SUPPRESS)  # internal: the read-through child process
    parser.add_argument("--keep", action="store_true", help="keep the corpora and run folders")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--data", default=data_folder(), help="folder holding tweet_sentiment_extraction/ "
                                                              "(default: %(default)s)")
    return parser.parse_args()


def data_folder() -> str:
    """Where tweet_sentiment_extraction is, searched as tunelab searches TUNELAB_DATA_PATH."""
    for entry in os.environ.get("TUNELAB_DATA_PATH", "data:../shared/data").split(os.pathsep):
        folder = Path(entry) if Path(entry).is_absolute() else ROOT / entry
        if (folder / "tweet_sentiment_extraction").is_dir():
            return str(folder)
    return "../shared/data"


def parse_size(text: str) -> int:
    """'10MB' → bytes."""
    number, unit = text.strip().upper()[:-2], text.strip().upper()[-2:]
    if unit not in UNITS:
        raise SystemExit(f"size '{text}' needs a unit: KB, MB or GB")
    return int(float(number) * UNITS[unit])


def write_corpus(tweets: list[str], folder: Path, size: int, test_file: Path) -> int:
    """train.jsonl of about `size` bytes (passes over the tweets, each shuffled by its pass number and tagged with
    it) and the test tweets beside it; returns the number of train rows. Written one pass at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(test_file, folder / "test.jsonl")
    rows = written = number = 0
    with (folder / "train.jsonl").open("w", encoding="utf-8") as out:
        while written < size:
            number += 1
            lines = []
            for tweet in random.Random(number).sample(tweets, len(tweets)):
                lines.append(json.dumps({"text": f"{tweet} #{number}"}) + "\n")
                written += len(lines[-1].encode("utf-8"))
                if written >= size:
                    break
            out.write("".join(lines))
            rows += len(lines)
    return rows


def train(corpus: Path, output: Path, args: argparse.Namespace, streaming: bool, hf_cache: Path) -> dict:
    """One `tunelab train` process on `corpus`; its peak RSS, wall time and metrics."""
    overrides = [f"data.source={corpus}", "data.train_size=null", f"data.eval_size={args.eval_size}",
                 f"data.streaming={'true' if streaming else 'false'}", f"train.max_steps={args.max_steps}",
                 "train.logging_steps=5", "eval.batch_size=8"]
    command = [sys.executable, "-m", "tunelab", "train", str(RECIPE), *overrides, "--output", str(output), "--quiet"]
    # the datasets cache of the run read whole goes with the workdir, not into ~/.cache
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache)}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tunelab train failed on {corpus} (streaming {streaming}); command: {' '.join(command)}")
    metrics = json.loads((output / "metrics.json").read_text())
    return {"peak_rss_gib": usage.ru_maxrss / (1 << 20), "wall_seconds": round(seconds, 1),  # ru_maxrss: KiB
            "train_tokens_per_second": metrics.get("train_tokens_per_second"),
            "train_tokens": metrics.get("train_tokens"), "train_loop_samples": metrics.get("train_loop_samples"),
            "loss_before": metrics["before"]["loss"], "loss_after": metrics["after"]["loss"]}


def read_stream(corpus: Path, megabytes: int) -> dict:
    """Child process: iterate the first `megabytes` MB of `corpus` through tunelab's streamed pretrain data path
    (the recipe's tokenizer, no model) and report RSS along the way."""
    import psutil

    from tunelab.data.generative import load_generative_data, shuffle_stream
    from tunelab.data.sft_encoding import encode_text_split
    from tunelab.models.loading import load_tokenizer, resolve_model
    from tunelab.recipe import load_recipe

    recipe = load_recipe(RECIPE, [f"data.source={corpus}", "data.train_size=null", "data.streaming=true",
                                  "train.max_steps=1"])
    tokenizer = load_tokenizer(resolve_model(recipe.model.name).location)
    data = load_generative_data(recipe.data, plain_text=True)
    rows = encode_text_split(tokenizer, shuffle_stream(data.train, recipe.train.seed))
    total_rows = int((corpus / "rows").read_text())
    size = (corpus / "train.jsonl").stat().st_size
    limit = max(1, round(total_rows * min(1.0, megabytes * UNITS["MB"] / size)))
    first_10mb = max(1, round(total_rows * min(1.0, 10 * UNITS["MB"] / size)))
    result, tokens, started = {}, 0, time.perf_counter()
    for count, row in enumerate(rows, 1):
        tokens += len(row["input_ids"])
        if count == first_10mb:
            result["rss_after_10mb_gib"] = psutil.Process().memory_info().rss / (1 << 30)
        if count >= limit:
            break
    result["rss_end_gib"] = psutil.Process().memory_info().rss / (1 << 30)
    return {**result, "rows_read": count, "tokens": tokens, "seconds": round(time.perf_counter() - started, 1)}


def read_through(corpus: Path, megabytes: int) -> dict:
    """read_stream in a process of its own: its report and its peak RSS."""
    command = [sys.executable, __file__, "--read-stream", str(corpus), "--read-mb", str(megabytes)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"reading {corpus} through the data path failed; command: {' '.join(command)}")
    return {**json.loads(output.decode().splitlines()[-1]), "peak_rss_gib": usage.ru_maxrss / (1 << 20)}


def table(runs: list[dict]) -> None:
    """One markdown row per setting (corpus, streamed or whole): every run's peak, the mean's ratio to the smallest
    streamed corpus's mean, mean training tokens/s and wall seconds."""
    settings: dict[tuple, list[dict]] = {}
    for run in runs:
        settings.setdefault((run["corpus_bytes"], run["streaming"]), []).append(run)
    means = {key: statistics.mean(run["peak_rss_gib"] for run in group) for key, group in settings.items()}
    base = next(mean for (_, streaming), mean in means.items() if streaming)
    print("\n| corpus | rows | data | max_steps | peak RSS GiB (each run) | vs smallest streamed (means) | train tok/s "
          "| wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for key, group in settings.items():
        first = group[0]
        peaks = " / ".join(f"{run['peak_rss_gib']:.2f}" for run in group)
        speeds = [run["train_tokens_per_second"] for run in group if run["train_tokens_per_second"]]
        speed = f"{statistics.mean(speeds):,.0f}" if speeds else "?"
        print(f"| {show_size(first['corpus_bytes'])} | {first['rows']:,} | "
              f"{'streamed' if first['streaming'] else 'whole'} | {first['max_steps']} | {peaks} | "
              f"{means[key] / base:.3f}x | {speed} | {statistics.mean(run['wall_seconds'] for run in group):.0f} |")


def show_size(size: int) -> str:
    return f"{size / UNITS['GB']:.2f} GB" if size >= UNITS["GB"] else f"{size / UNITS['MB']:.1f} MB"


def main() -> int:
    args = arguments()
    if args.read_stream:
        print(json.dumps(read_stream(Path(args.read_stream), args.read_mb)))
        return 0
    sizes = [parse_size(text) for text in args.sizes.split(",")]
    if args.skip_1gb:
        sizes = [size for size in sizes if size < UNITS["GB"]]
    tweets_dir = Path(args.data) / "tweet_sentiment_extraction"
    with (tweets_dir / "train.jsonl").open(encoding="utf-8") as lines:
        tweets = [text.strip() for text in (json.loads(line)["text"] for line in lines) if text and text.strip()]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tunelab-streaming-"))
    runs = []
    try:
        settings = [(size, True) for size in sizes] + ([] if args.no_contrast else [(sizes[0], False)])
        for repeat, (size, streaming) in [(repeat, setting) for repeat in range(args.repeats) for setting in settings]:
            corpus = workdir / f"corpus-{show_size(size).replace(' ', '')}"
            if not (corpus / "train.jsonl").is_file():
                started = time.perf_counter()
                rows = write_corpus(tweets, corpus, size, tweets_dir / "test.jsonl")
                (corpus / "rows").write_text(str(rows))
                print(f"wrote {corpus / 'train.jsonl'}: {rows:,} rows in {time.perf_counter() - started:.0f} s",
                      flush=True)
            rows = int((corpus / "rows").read_text())
            output = workdir / "runs" / f"{corpus.name}-{'streamed' if streaming else 'whole'}"
            shutil.rmtree(output, ignore_errors=True)
            print(f"training on {show_size(size)} ({'streamed' if streaming else 'read whole'}), run {repeat + 1} …",
                  flush=True)
            result = train(corpus, output, args, streaming, workdir / "hf-cache")
            runs.append({"corpus_bytes": (corpus / "train.jsonl").stat().st_size, "rows": rows,
                         "streaming": streaming, "max_steps": args.max_steps, "repeat": repeat, **result})
            print(f"  peak RSS {result['peak_rss_gib']:.2f} GiB, {result['wall_seconds']:.0f} s", flush=True)
        if args.read_mb:
            largest = workdir / f"corpus-{show_size(sizes[-1]).replace(' ', '')}"
            print(f"reading {args.read_mb} MB of {largest / 'train.jsonl'} through the data path …", flush=True)
            reading = {"corpus_bytes": (largest / "train.jsonl").stat().st_size, "read_mb": args.read_mb,
                       **read_through(largest, args.read_mb)}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    table(runs)
    if args.read_mb:
        after_10mb = reading.get("rss_after_10mb_gib")
        print(f"\nData path only (no model), {show_size(reading['corpus_bytes'])} corpus: {reading['rows_read']:,} "
              f"rows ({reading['tokens']:,} tokens) of its first {args.read_mb} MB in {reading['seconds']:.0f} s; "
              f"RSS after 10 MB {after_10mb or float('nan'):.3f} GiB, at the end {reading['rss_end_gib']:.3f} GiB, "
              f"peak {reading['peak_rss_gib']:.3f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": str(RECIPE.relative_to(ROOT)), "runs": runs,
                                               "read_through": reading if args.read_mb else None}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
