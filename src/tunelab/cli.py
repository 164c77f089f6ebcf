"""The `tunelab` command: parse arguments, call the API, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from tunelab.bench import add_arguments as add_bench_arguments  # stdlib-only at import time
from tunelab.distributed import Launch, LaunchFailed
from tunelab.errors import TunelabError
from tunelab.runs.reading import headline_changes


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one `error:` line like every other tunelab error."""

    def error(self, message: str):
        raise TunelabError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = ArgumentParser(prog="tunelab", description="Fine-tune pretrained transformers on your data.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="validate, score the baseline, train, score again, write a run folder")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=3 method.r=8")
    train.add_argument("--output", help="run folder to create (default: runs/<name>-<timestamp>)")
    train.add_argument("--resume", action="store_true", help="finish the interrupted run in --output")
    train.add_argument("--seeds", type=positive_int, default=1,
                       help="run the recipe with N seeds (data.seed and train.seed + 0 … N-1) into one folder and "
                            "report mean ± std over them (classify and fewshot)")
    scale = train.add_argument_group("several processes or machines (through torch.distributed.run, as torchrun)")
    scale.add_argument("--nproc", type=positive_int, help="processes on this machine (e.g. one per GPU; on a CPU "
                                                          "each gets one thread unless OMP_NUM_THREADS is set); "
                                                          "train.batch_size is split over all processes")
    scale.add_argument("--nnodes", type=positive_int, default=1, help="machines taking part (default: %(default)s)")
    scale.add_argument("--node-rank", type=int, default=0, help="this machine's place, 0 … nnodes-1 (with "
                                                                "--master-addr)")
    scale.add_argument("--master-addr", help="address of the machine with --node-rank 0")
    scale.add_argument("--master-port", type=positive_int, help="free port on that machine (default: 29500)")
    scale.add_argument("--rdzv-endpoint", help="HOST:PORT of a c10d rendezvous instead of --master-addr and "
                                               "--node-rank (every machine gives the same)")
    shown = train.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="print only the result line")
    shown.add_argument("--json", action="store_true", help="print only the final metrics, as one JSON line")

    tune = commands.add_parser("tune", help="search hyperparameters on Optuna, judged on validation only; then "
                                            "the winner against your recipe on the reported split")
    tune.add_argument("recipe", nargs="?", help="recipe YAML file (omit with --resume)")
    tune.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the recipe")
    tune.add_argument("--trials", type=positive_int, default=16, help="trials in all (default: %(default)s)")
    tune.add_argument("--space", help="YAML of recipe keys and ranges, e.g. train.learning_rate: {log_uniform: "
                                      "[1.0e-5, 1.0e-3]} (default: the task and method's own space; README)")
    tune.add_argument("--timeout", type=duration, help="stop starting trials after this long, e.g. 30m, 2h, 90s")
    tune.add_argument("--workers", type=positive_int, default=1, help="trial processes on this machine, the cores "
                                                                      "split between them (default: 1)")
    tune.add_argument("--storage", help="Optuna storage shared by workers on several machines: postgresql://…, "
                                        "mysql://…, sqlite:///PATH or journal:PATH (default: the study folder's "
                                        "SQLite file)")
    tune.add_argument("--study", help="study name in --storage; every machine gives the same (default: the folder's)")
    tune.add_argument("--metric", help="validation score to optimise (default: the task's: accuracy, loss, …)")
    tune.add_argument("--output", help="study folder to create (default: runs/<name>-tune-<timestamp>)")
    tune.add_argument("--resume", action="store_true", help="continue the killed study in --output")
    tune.add_argument("--refit", action="store_true", help="train the winner and your recipe once more on train + "
                                                           "validation and compare those (default: the two trials' "
                                                           "models as trained); with --resume, also of a finished "
                                                           "study")
    tune.add_argument("--search-only", action="store_true", help="run trials only (extra machines joining a study); "
                                                                 "no final runs")

    validate = commands.add_parser("validate", help="check a recipe and its data; print the resolved recipe")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")

    evaluate = commands.add_parser("eval", help="score a trained run or model on a dataset")
    evaluate.add_argument("model", help="run folder or model folder")
    evaluate.add_argument("--data", required=True, help="Hub id, file or folder")
    evaluate.add_argument("--split", default="test", help="split to score (a single file is split 'train')")
    evaluate.add_argument("--text", help="text column (default: the run's recipe, else 'text')")
    evaluate.add_argument("--label", help="label column (default: the run's recipe, else 'label')")
    evaluate.add_argument("--size", type=positive_int, help="score a stratified sample of this many rows")
    evaluate.add_argument("--in-context", type=positive_int, metavar="K",
                          help="instead: prompt MODEL (a decoder alias or folder, untrained) with K labelled examples "
                               "per class from --data's train split and score it on --split")

    predict = commands.add_parser("predict", help="label texts with a trained run")
    predict.add_argument("model", help="run folder or model folder")
    predict.add_argument("texts", nargs="*", help="texts to label")
    predict.add_argument("--file", help="JSONL file of rows to label (field given by --field)")
    predict.add_argument("--field", default="text", help="field of each --file row holding the text")
    predict.add_argument("--top-k", type=positive_int, default=1, help="also list the k most likely labels")

    generate = commands.add_parser("generate", help="answer prompts with a trained sft/pretrain/seq2seq run")
    generate.add_argument("model", help="run folder")
    generate.add_argument("texts", nargs="*", help="prompts (put into the run's prompt template / chat template)")
    generate.add_argument("--file", help="JSONL file of prompts (field given by --field)")
    generate.add_argument("--field", default="text", help="field of each --file row holding the prompt")
    add_generation_options(generate)

    chat = commands.add_parser("chat", help="talk to a trained sft run in the terminal (its chat template, streamed)")
    chat.add_argument("model", help="run folder")
    chat.add_argument("--system", help="a system message that opens the conversation")
    add_generation_options(chat, default_tokens=256)

    commands.add_parser("models", help="list offline model aliases and whether they are installed")

    export = commands.add_parser("export", help="write a finished run as a plain Hugging Face folder, a GGUF file "
                                                "for llama.cpp / Ollama, or an ONNX Runtime graph")
    export.add_argument("model", help="finished run folder")
    export.add_argument("--output", required=True, help="folder to create (never an existing one)")
    export.add_argument("--format", default="hf", choices=["hf", "gguf", "onnx"],
                        help="hf: merged safetensors folder (default); gguf: decoder runs (Llama, Qwen2); onnx: "
                             "encoder classifier and reward runs")
    export.add_argument("--quantize", help="gguf weight type: f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, q4_0, f32")
    export.add_argument("--verify", action="store_true",
                        help="then score the run's eval split through the exported file in its runtime (hf: "
                             "transformers in a fresh process; onnx: ONNX Runtime; gguf: llama.cpp when "
                             "llama-cpp-python is installed, else transformers' GGUF loader) and through the run: "
                             "the difference with a paired 95%% interval, in verify.json and the model card "
                             "(classify and sft runs)")
    export.add_argument("--verify-size", type=positive_int, metavar="N",
                        help="verify on the eval split's first N rows (implies --verify)")

    serve = commands.add_parser("serve", help="serve a run, model folder or alias behind an OpenAI-compatible HTTP "
                                              "API (chat/completions, embeddings, classify)",
                                description="Serve MODEL behind an OpenAI-compatible HTTP API. Listens on 127.0.0.1 "
                                            "unless --host says otherwise; answers only Host headers naming this "
                                            "machine (loopback names, IP addresses, --host, --allowed-hosts); a "
                                            "request body must arrive whole within TUNELAB_SERVE_BODY_TIMEOUT "
                                            "seconds (default 10) and be at most 1 MiB.")
    serve.add_argument("model", help="run folder (sft/pretrain/classify/fewshot), Hugging Face model folder (e.g. "
                                     "an export), .gguf file or alias")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                                                           "machine only)")
    serve.add_argument("--port", type=positive_int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request; other users see it "
                                         "in `ps`: prefer --api-key-file or env TUNELAB_API_KEY (read when neither "
                                         "flag is given)")
    serve.add_argument("--api-key-file", metavar="PATH", help="read the API key from the first line of this file")
    serve.add_argument("--allowed-hosts", action="append", default=[], metavar="NAMES",
                       help="comma-separated Host names answered besides loopback names, IP addresses and --host's "
                            "own name (DNS rebinding guard); may repeat; '*' answers any Host")
    serve.add_argument("--max-batch", type=positive_int, default=16,
                       help="most answers generated together in one batch (default: %(default)s)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "int8"], default="auto",
                       help="weights of a text generator: auto (default: int8 on a CPU with native bf16, bfloat16 "
                            "on a GPU that has it, else float32), float32 (a greedy answer is the same in any "
                            "batch), bfloat16 (fastest batches) or int8 (fastest single answers); both need a CPU "
                            "with native bf16 or a GPU (int8: CPU only), and their answers may differ a little "
                            "from float32's and shift with the batch")
    serve.add_argument("--compile", action="store_true",
                       help="decode an answer that runs alone through a compiled step (torch.compile): faster "
                            "single answers after up to a minute of compiling at start and per longer answer "
                            "length; float32 and int8 only")

    curve = commands.add_parser("curve", help="learning curve: run a recipe at k examples per class × seeds × "
                                              "methods; table, plot and report in one folder")
    curve.add_argument("recipe", help="recipe YAML file")
    curve.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every run")
    curve.add_argument("--shots", default="4,8,16,32,all", help="examples per class, comma-separated; 'all' = "
                                                                "the recipe's training data (default: %(default)s)")
    curve.add_argument("--seeds", type=positive_int, default=3, help="runs per point (default: %(default)s)")
    curve.add_argument("--methods", help="comma-separated: fewshot, full, lora, dora, ia3, prompt, freeze:head, "
                                         "freeze:topN, freeze:gradual (default: the recipe's own)")
    curve.add_argument("--metric", choices=["accuracy", "macro_f1"], default="accuracy", help="metric plotted")
    curve.add_argument("--output", help="curve folder (default: runs/<name>-curve-<timestamp>); the same command "
                                        "into the same folder continues an interrupted curve")

    pipeline = commands.add_parser("pipeline", help="run chained stages (e.g. sft → reward → dpo), each from an "
                                                    "earlier stage's run folder; re-running finishes a killed chain")
    pipeline.add_argument("pipeline", help="pipeline YAML file (see examples/rlhf_pipeline.yaml)")
    pipeline.add_argument("--output", help="folder holding one run folder per stage (default: runs/<name>); the "
                                           "same command into the same folder skips finished stages")

    ui = commands.add_parser("ui", help="the web board: list, launch, watch, compare and try runs in a browser")
    ui.add_argument("--runs", default="runs", help="folder holding the run folders (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                                                        "only)")
    ui.add_argument("--port", type=positive_int, default=7860, help="port (default: %(default)s)")
    ui.add_argument("--allowed-hosts", action="append", default=[], metavar="NAMES",
                    help="comma-separated Host names answered besides loopback names, IP addresses and --host's own "
                         "name (DNS rebinding guard); may repeat; '*' answers any Host")
    ui.add_argument("--token-file", help="file holding the token every request must carry (else $TUNELAB_UI_TOKEN; "
                                         "else, on an address other than loopback, a random one printed at start)")

    add_bench_arguments(commands.add_parser("bench", help="speed/memory suite: each example job three ways "
                                                          "(tutorial, hand-written, tunelab), side by side"))
    return parser


TRAILING_LISTS = {"train": "overrides", "tune": "overrides", "validate": "overrides", "predict": "texts",
                  "curve": "overrides", "generate": "texts"}


def add_generation_options(parser: argparse.ArgumentParser, default_tokens: int = 64) -> None:
    """--max-new-tokens and --temperature."""
    parser.add_argument("--max-new-tokens", type=positive_int, default=default_tokens,
                        help="longest answer in tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="0 = greedy, reproducible (default); above 0 samples")


def duration(text: str) -> float:
    """argparse type: seconds from '90', '90s', '30m' or '2h'."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:].lower() in units else (text, "s")
    try:
        seconds = float(number) * units[unit.lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration; write e.g. 90s, 30m or 2h") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return seconds


def non_negative_float(text: str) -> float:
    """argparse type: a number ≥ 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def accept_interrupts() -> None:
    """Make SIGINT (Ctrl-C, Studio's Stop) raise KeyboardInterrupt again in a process started with it ignored, as a
    shell starts its background jobs (`tunelab ui &`) and so their children: Python then installs no handler, and a
    run would never hear Stop (nor save its "interrupted; resume with …" state)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one `error:` line and exit with code 2."""
    accept_interrupts()
    try:
        args = parse_arguments(argv)
        quiet_libraries()
        return COMMANDS[args.command](args)
    except TunelabError as exc:
        from tunelab.distributed import prints_errors, record_error

        record_error(exc)  # under a launcher: the one line it shows for the whole job
        if prints_errors():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except LaunchFailed as failed:
        if failed.traceback:  # not a tunelab error: where it happened matters
            print(failed.traceback.rstrip(), file=sys.stderr)
        print(f"error: {failed.message}" + (f" (rank {failed.rank})" if failed.rank else ""), file=sys.stderr)
        return failed.exitcode if failed.exitcode > 0 else 1
    except KeyboardInterrupt:
        print("error: interrupted; resume with the same command plus --output RUN_DIR --resume", file=sys.stderr)
        return 130
    except Exception as exc:
        from tunelab.distributed import launched_by_tunelab, record_error

        record_error(exc)
        if launched_by_tunelab():  # `tunelab train --nproc` shows the first failing rank's error, once
            return 1
        raise


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line, accepting list arguments (overrides, texts) after options too."""
    parser = build_parser()
    # argparse stops filling a positional list at the first option, so `train r.yaml --output D train.epochs=2`
    # leaves the override over: put such leftovers back into the command's list (overrides or texts).
    args, leftovers = parser.parse_known_args(argv)
    trailing = TRAILING_LISTS.get(args.command)
    if leftovers and (trailing is None or any(item.startswith("-") for item in leftovers)):
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    if leftovers:
        setattr(args, trailing, [*getattr(args, trailing), *leftovers])
    return args


def quiet_libraries() -> None:
    """Hide library chatter (load reports, weight-loading and shard-writing bars, map progress, warnings) so
    tunelab's own lines and the training bar stand out; warnings go to the run's log.jsonl instead."""
    from tunelab.console import capture_warnings

    # Set before the libraries load (importing them here would slow every command, errors included); a user's own
    # setting wins. The bars: transformers' "Loading weights" / "Writing model shards", the Hub's, datasets' maps.
    # datasets logs a parse failure as an error before raising it; tunelab reports the raised error itself.
    for key, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:  # already loaded (the CLI called in-process, e.g. by tests)
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity(sys.modules["datasets"].logging.CRITICAL)
    capture_warnings()


QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "DATASETS_VERBOSITY": "critical"}


def cmd_train(args) -> int:
    from tunelab.console import set_quiet
    from tunelab.distributed import is_main_process
    from tunelab.models.names import check_model_answers_at_once
    from tunelab.recipe import load_recipe

    set_quiet(args.quiet or args.json)
    recipe = load_recipe(args.recipe, args.overrides)
    check_model_answers_at_once(recipe.model.name)  # before the training stack loads
    if args.nproc or args.nnodes > 1 or args.rdzv_endpoint:
        return launch_train(args, recipe)

    from tunelab import api
    if args.seeds > 1:
        return train_seeds(args, recipe)
    run_dir, metrics = api.train(recipe, args.output, args.resume)
    if not is_main_process():
        return 0
    if args.json:
        print(json.dumps(result_record(run_dir, recipe.task, metrics), ensure_ascii=False))
    elif args.quiet:
        print(f"tunelab: {headline_changes(metrics)}; report: {run_dir / 'report.html'}")
    else:
        print(f"tunelab: {metrics['train_samples_per_second']:.2f} train samples/s; report: {run_dir / 'report.html'}")
    return 0


def cmd_tune(args) -> int:
    from tunelab.tune.study import TuneRequest, tune

    if args.resume and args.recipe is not None and args.recipe.endswith((".yaml", ".yml")):
        raise TunelabError("--resume continues the study in --output with its own recipe; drop the recipe argument")
    study_dir, summary = tune(TuneRequest(
        recipe=args.recipe, overrides=tuple(args.overrides), trials=args.trials, space=args.space,
        timeout=args.timeout, workers=args.workers, storage=args.storage, study=args.study, output=args.output,
        resume=args.resume, metric=args.metric, refit=args.refit, search_only=args.search_only))
    counts = summary["counts"]
    print(f"tunelab tune: {counts['complete']} trials finished, {counts['pruned']} pruned, {counts['fail']} failed in "
          f"{summary['wall_seconds'] / 60:.1f} min")
    final = summary["final"]
    if final is not None:
        for metric, line in final["verdict"].items():
            print(f"tunelab tune: {metric} on {final['reported_on']}, your recipe → tuned: {line}")
        for name, summary in final.get("retention", {}).items():
            print(f"tunelab tune: general ability, {name}: {summary}")
        print(f"tunelab tune: best recipe {study_dir / 'best_recipe.yaml'}; report {study_dir / 'report.html'}")
    return 0


def launch_train(args, recipe) -> int:
    """--nproc N (and --nnodes …): the same `tunelab train` command on N processes per machine, through torch's
    launcher; the batch split is checked here, before any process starts."""
    from tunelab.distributed import check_plan, launch

    if args.seeds > 1:
        raise TunelabError("--seeds runs one process per seed; drop --nproc, or run the seeds one by one")
    plan = Launch(args.nproc or 1, args.nnodes, args.node_rank, args.master_addr, args.master_port,
                  args.rdzv_endpoint)
    check_plan(recipe, plan.nproc * plan.nnodes, plan.nnodes, launched=True, resume=args.resume)
    forwarded = [args.recipe, *args.overrides, *(["--output", args.output] if args.output else []),
                 *(["--resume"] if args.resume else []), *(["--quiet"] if args.quiet else []),
                 *(["--json"] if args.json else [])]
    return launch(plan, ["train", *forwarded])


def result_record(run_dir: Path, task: str, metrics: dict) -> dict:
    """What --json prints: the run folder, the scalar scores before and after, their intervals, the gain, and
    which split was reported and which picked the checkpoint."""
    def scalars(scores: dict) -> dict:
        return {key: value for key, value in scores.items() if isinstance(value, int | float)}

    keys = ("intervals", "gain", "win_rate", "win_rate_interval", "selected_on", "reported_on", "eval_rows",
            "train_seconds")
    return {"run": str(run_dir), "task": task, "before": scalars(metrics["before"]),
            "after": scalars(metrics["after"]), **{key: metrics[key] for key in keys if key in metrics}}


def train_seeds(args, recipe) -> int:
    """--seeds N: the recipe N times (seeds + 0 … N-1) as one curve point, runs in one folder, mean ± std."""
    from tunelab import curve

    if args.resume:
        raise TunelabError("--seeds continues an interrupted set by itself: give the same --output, without --resume")
    folder, spread = curve.run_seeds(args.recipe, recipe, args.seeds, args.output, args.overrides)
    if args.json:
        print(json.dumps({"folder": str(folder), "seeds": args.seeds, **spread}))
        return 0
    shown = "; ".join(f"{name} {value['mean']:.4f} ± {value['std']:.4f}" for name, value in spread.items())
    print(f"tunelab: {args.seeds} seeds: {shown} (mean ± sample std); summary: {folder / 'curve.csv'}; report: "
          f"{folder / 'report.html'}")
    return 0


def cmd_validate(args) -> int:
    from tunelab.models.names import check_model_answers_at_once
    from tunelab.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    check_model_answers_at_once(recipe.model.name)  # before the training stack loads

    from tunelab import api
    from tunelab.data.sources import row_count
    data, source = api.check_recipe(recipe)
    print(recipe.to_yaml(), end="")
    if hasattr(data, "labels"):
        what = f"{len(data.labels)} labels"
    elif hasattr(data, "paired"):
        what = "chosen/rejected pairs" if data.paired else "unpaired good/bad completions"
    else:
        what = f"format {data.format}"
    print(f"# ok: {row_count(data.train) or 'streamed'} train rows, {len(data.eval)} eval rows ({data.eval_split}), "
          f"{what}; model {source.location}")
    return 0


def cmd_eval(args) -> int:
    from tunelab import api
    from tunelab.recipe import DataConfig

    saved = run_recipe_data(args.model)
    data = DataConfig(source=args.data, text=args.text or saved.get("text", "text"),
                      label=args.label or saved.get("label", "label"), text_pair=saved.get("text_pair"),
                      eval_size=args.size)
    if args.in_context:
        data = data.model_copy(update={"eval_split": args.split})
        print(json.dumps(api.evaluate_in_context(args.model, data, args.in_context), indent=2))
        return 0
    print(json.dumps(api.evaluate(args.model, data, args.split), indent=2))
    return 0


def run_recipe_data(model: str) -> dict:
    """The data section of a run folder's recipe, for default column names."""
    import yaml

    recipe = Path(model) / "recipe.yaml"
    saved = yaml.safe_load(recipe.read_text()) if recipe.is_file() else None
    data = saved.get("data") if isinstance(saved, dict) else None
    return data if isinstance(data, dict) else {}


def cmd_predict(args) -> int:
    from tunelab import api

    texts = collect_texts(args, "predict", "texts")
    for row in api.predict(args.model, texts, args.top_k):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def collect_texts(args, command: str, what: str) -> list[str]:
    """The texts given as arguments plus those of --file; a one-line error when there are none."""
    texts = list(args.texts)
    if args.file:
        texts += read_texts(Path(args.file), args.field)
    if not texts:
        raise TunelabError(f"{command} needs {what}: give them as arguments or with --file rows.jsonl")
    return texts


def read_texts(path: Path, field: str) -> list[str]:
    """The `field` of each row of a JSONL file."""
    if not path.is_file():
        raise TunelabError(f"--file '{path}' does not exist")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)[field]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TunelabError(f"--file '{path}' line {number} is not a JSON object with field '{field}'; "
                               f"fix the line or pass --field") from None
    return texts


def cmd_generate(args) -> int:
    from tunelab import api

    texts = collect_texts(args, "generate", "prompts")
    for text, answer in zip(texts, api.generate(args.model, texts, args.max_new_tokens, args.temperature),
                            strict=True):
        print(json.dumps({"prompt": text, "answer": answer}, ensure_ascii=False))
    return 0


def cmd_chat(args) -> int:
    from tunelab import api

    generator, settings = api.load_generator(args.model), api.generation_settings(args.max_new_tokens,
                                                                                  args.temperature)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("tunelab chat: type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        reply = ""
        for piece in generator.stream_chat(messages, settings):
            print(piece, end="", flush=True)
            reply += piece
        print()
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def cmd_export(args) -> int:
    from tunelab import api

    verify = args.verify or args.verify_size is not None
    folder = api.export(args.model, args.output, args.format, args.quantize, verify, args.verify_size)
    print(f"tunelab: exported {args.model} as {args.format} to {folder}: "
          f"{', '.join(sorted(path.name for path in folder.iterdir()))}")
    if verify:
        verified = json.loads((folder / "verify.json").read_text(encoding="utf-8"))
        for line in [verified["summary"], *verified["warnings"]]:
            print(line)
    return 0


def cmd_models(args) -> int:
    from tunelab.models.aliases import OFFLINE_MODELS

    for model in OFFLINE_MODELS.values():
        installed = model.locate() is not None
        print(f"{model.alias:20} {model.family:8} {'installed' if installed else 'missing':10} {model.description}")
        if not installed:
            print(f"{'':40} install: {model.install}")
    return 0


def cmd_serve(args) -> int:
    from tunelab.serve.app import choose_api_key, serve

    api_key = choose_api_key(args.api_key, args.api_key_file)
    allowed_hosts = [name for names in args.allowed_hosts for name in names.split(",")]
    return serve(args.model, args.host, args.port, api_key, args.max_batch, args.dtype, allowed_hosts, args.compile)


def cmd_bench(args) -> int:
    from tunelab import bench

    return bench.run(args)


def cmd_curve(args) -> int:
    from tunelab import curve

    shots = curve.parse_shots(args.shots)
    methods = curve.parse_methods(args.methods) if args.methods else None
    curve.run_curve(args.recipe, shots, args.seeds, methods, args.output, args.overrides, args.metric)
    return 0


def cmd_ui(args) -> int:
    from tunelab.ui.app import serve

    allowed_hosts = tuple(name for names in args.allowed_hosts for name in names.split(","))
    serve(args.runs, args.host, args.port, allowed_hosts, args.token_file)
    return 0


def cmd_pipeline(args) -> int:
    from tunelab.pipeline import run_pipeline

    results = run_pipeline(args.pipeline, args.output)
    for name, result in results.items():
        print(f"tunelab: {name} ({result['task']}): {headline_changes(result)} — {result['run']}")
    return 0


COMMANDS = {"train": cmd_train, "tune": cmd_tune, "validate": cmd_validate, "eval": cmd_eval, "predict": cmd_predict,
            "models": cmd_models, "bench": cmd_bench, "curve": cmd_curve, "generate": cmd_generate, "chat": cmd_chat,
            "pipeline": cmd_pipeline, "ui": cmd_ui, "export": cmd_export, "serve": cmd_serve}
