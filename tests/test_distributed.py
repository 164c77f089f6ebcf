"""One recipe on two processes through torch's launcher (gloo, one thread each): one run folder written by rank 0,
the same rows in every optimizer step and the same scores as one process, a refused batch split, one error line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import toy_recipe
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

import tunelab
from tunelab.cli import main
from tunelab.distributed import World, failure_message, first_recorded_failure, shard_bounds

SOURCE = Path(tunelab.__file__).resolve().parents[1]  # the tunelab the launched processes must import too
RUN_FILES = {"recipe.yaml", "baseline.json", "log.jsonl", "metrics.json", "predictions.jsonl", "report.html", "model",
             "per_row.json"}


def launch_env(extra_path: Path | None = None) -> dict:
    """The test's environment for launched processes: this tunelab first, one thread per process."""
    paths = [str(extra_path)] if extra_path else []
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([*paths, str(SOURCE), os.environ.get("PYTHONPATH", "")])}


def tunelab_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", "train", *args], capture_output=True, text=True,
                          env=env or launch_env(), timeout=300)


@pytest.fixture(scope="module")
def recipe_path(tiny_bert, toy_data, tmp_path_factory) -> Path:
    """The toy recipe on a tiny BERT without dropout (each process would draw other dropout masks than one process
    does), a few logged steps; 45 eval rows, which do not split evenly over 2 processes."""
    folder = tmp_path_factory.mktemp("distributed")
    model = folder / "bert-no-dropout"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    recipe = toy_recipe(model, toy_data)
    # 90 rows / batch 8: 11 full steps an epoch, then a short one of 2 rows (on 2 processes rank 0 gets both and
    # 2 filler rows, rank 1 only filler rows, which count for nothing); 24 logged losses
    recipe["train"].update(epochs=2, logging_steps=1)
    path = folder / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def one_and_two(recipe_path) -> tuple[Path, Path]:
    """The same recipe run by one process and by two (tunelab train --nproc 2), each into its own folder."""
    one, two = recipe_path.parent / "runs-1" / "run", recipe_path.parent / "runs-2" / "run"
    for output, extra in ((one, []), (two, ["--nproc", "2"])):
        finished = tunelab_train(str(recipe_path), "--output", str(output), *extra)
        assert finished.returncode == 0, finished.stderr[-3000:]
    return one, two


def losses(run: Path) -> list[float]:
    return [entry["loss"] for entry in json.loads((run / "metrics.json").read_text())["history"] if "loss" in entry]


def test_two_processes_write_one_run_folder_from_rank_zero(one_and_two):
    _, two = one_and_two
    assert [path.name for path in two.parent.iterdir()] == ["run"]  # no second folder from rank 1
    assert {path.name for path in two.iterdir()} == RUN_FILES  # checkpoints dropped at the end, as on one process
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in log if "loss" in row]
    assert steps == list(range(1, 25)), "each step logged once: only rank 0 writes the log"
    metrics = json.loads((two / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["strategy"], metrics["global_batch_size"]) == (2, "ddp", 8)
    assert len((two / "predictions.jsonl").read_text().splitlines()) == 45
    # DDP's own timers: the gradient all-reduce of 24 steps, and the part of it the backward pass did not hide
    assert 0 < metrics["communication_seconds"] < metrics["train_loop_seconds"]
    assert 0 <= metrics["communication_exposed_seconds"] <= metrics["communication_seconds"]


def test_two_processes_train_on_the_same_rows_as_one(one_and_two):
    one, two = one_and_two
    single, double = losses(one), losses(two)
    assert len(single) == len(double) == 24
    for a, b in zip(single, double, strict=True):
        assert abs(a - b) <= 1e-6 * abs(a), (single, double)


def test_sharded_scores_equal_one_process_scores(one_and_two):
    one, two = (json.loads((run / "metrics.json").read_text()) for run in one_and_two)
    assert one["world_size"] == 1 and one["strategy"] == "single" and "communication_seconds" not in one
    for phase in ("before", "after"):
        assert one[phase]["accuracy"] == two[phase]["accuracy"]
        assert one[phase]["macro_f1"] == two[phase]["macro_f1"]
        assert one[phase]["confusion_matrix"] == two[phase]["confusion_matrix"]
        assert sum(map(sum, two[phase]["confusion_matrix"])) == 45  # every eval row once, none padded in twice
    rows = [[json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()] for run in one_and_two]
    assert [row["predicted"] for row in rows[0]] == [row["predicted"] for row in rows[1]]
    for a, b in zip(*rows, strict=True):
        assert abs(a["probability"] - b["probability"]) <= 1e-5


def test_deepspeed_zero2_from_a_users_config_trains_like_one_process(recipe_path, one_and_two, tmp_path):
    # The user's own JSON config (ZeRO-2: optimizer state and gradients sharded over the 2 processes, on CPU)
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}))
    run = tmp_path / "run"
    finished = tunelab_train(str(recipe_path), "train.distributed.strategy=deepspeed",
                             f"train.distributed.deepspeed={config}", "--output", str(run), "--nproc", "2")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "DeepSpeed" not in finished.stdout + finished.stderr  # its banner and build notes stay off the console
    one, _ = one_and_two
    for a, b in zip(losses(one), losses(run), strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (losses(one), losses(run))
    metrics, single = (json.loads((folder / "metrics.json").read_text()) for folder in (run, one))
    assert (metrics["strategy"], metrics["world_size"], metrics["global_batch_size"]) == ("deepspeed zero2", 2, 8)
    assert metrics["after"]["confusion_matrix"] == single["after"]["confusion_matrix"]
    assert {path.name for path in run.iterdir()} == RUN_FILES
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "model")  # plain transformers loads it
    assert model.config.id2label == AutoModelForSequenceClassification.from_pretrained(one / "model").config.id2label


def test_a_batch_that_does_not_split_is_refused_before_anything_starts(recipe_path, tmp_path, capsys):
    output = tmp_path / "never"
    assert main(["train", str(recipe_path), "--output", str(output), "--nproc", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("error: train.batch_size 8 does not split over 3 processes")
    assert "train.batch_size=6 or 9" in error
    assert not output.exists()


def test_a_failed_rank_ends_the_job_with_its_error_once(recipe_path, tmp_path):
    # rank 1 alone fails as it reads the data (after rank 0 made the run folder and waits for it)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from tunelab import api\n"
        "    from tunelab.errors import TunelabError\n"
        "    def fail(recipe):\n"
        "        raise TunelabError('data.source cannot be read on this machine')\n"
        "    api.check_recipe = fail\n")
    finished = tunelab_train(str(recipe_path), "--output", str(tmp_path / "run"), "--nproc", "2",
                             env=launch_env(inject))
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if line.strip()]
    assert errors == ["error: data.source cannot be read on this machine (rank 1)"], finished.stderr[-3000:]
    assert "Traceback" not in finished.stdout


def test_a_killed_two_process_run_resumes_where_one_process_ends(recipe_path, one_and_two, tmp_path):
    # The killed attempt idles after its step-12 checkpoint (the end of epoch 1), so that the kill lands between
    # the two checkpoints.
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import time\n"
        "from transformers import Trainer\n"
        "step = Trainer.training_step\n"
        "def slow_step(self, *args, **kwargs):\n"
        "    if self.state.global_step >= 12:\n"
        "        time.sleep(2)\n"
        "    return step(self, *args, **kwargs)\n"
        "Trainer.training_step = slow_step\n")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "tunelab", "train", str(recipe_path), "train.checkpoint_every=12", "--output",
               str(killed), "--nproc", "2"]
    # its own session: the launcher and its processes die together, as on a lost machine or a cancelled job
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=launch_env(slow), start_new_session=True)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "checkpoint-12" / "trainer_state.json").is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()

    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=launch_env(), timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    one, _ = one_and_two
    assert losses(killed) == pytest.approx(losses(one), rel=1e-6)  # steps 1-12 before the kill, 13-24 after it
    logged = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert logged.count(1) == 1, "the resumed attempt continues from the checkpoint, not from step 1"
    resumed, straight = (json.loads((run / "metrics.json").read_text()) for run in (killed, one))
    assert resumed["after"]["confusion_matrix"] == straight["after"]["confusion_matrix"]


def test_without_recorded_errors_the_rank_that_died_of_itself_is_named_not_the_ones_the_agent_stopped(tmp_path):
    no_file = str(tmp_path / "none.json")
    stopped = ProcessFailure(local_rank=0, pid=101, exitcode=-signal.SIGTERM, error_file=no_file)
    killed = ProcessFailure(local_rank=1, pid=102, exitcode=-signal.SIGKILL, error_file=no_file)
    stopped.timestamp = killed.timestamp  # the same second, as when the agent stops the rest
    rank, failure = first_recorded_failure(ChildFailedError("train", {0: stopped, 1: killed}))
    assert rank == 1 and failure_message(failure) == "Signal 9 (SIGKILL) received by PID 102"
    exited = ProcessFailure(local_rank=1, pid=103, exitcode=1, error_file=no_file)
    rank, failure = first_recorded_failure(ChildFailedError("train", {0: stopped, 1: exited}))
    assert failure_message(failure) == "process 103 (local rank 1) exited with code 1 without recording an error"


def test_shards_cover_every_row_once():
    for rows in (0, 1, 45, 46):
        for size in (1, 2, 3, 8):
            blocks = [shard_bounds(rows, World(size=size, rank=rank)) for rank in range(size)]
            covered = [row for start, end in blocks for row in range(start, end)]
            assert covered == list(range(rows))


def test_accumulated_batches_give_the_mean_loss_not_the_sum(recipe_path, tmp_path):
    # the classifier's loss is the rows' mean over the whole step; before, with grad_accum 2 the Trainer added up
    # two micro-batch means (step-1 loss 2.20 on 3 labels, twice the gradient)
    from tunelab import api
    from tunelab.recipe import load_recipe

    recipe = load_recipe(recipe_path, ["train.batch_size=4", "train.grad_accum=2", "train.max_steps=2"])
    _, metrics = api.train(recipe, str(tmp_path / "run"))
    first = [entry for entry in metrics["history"] if "loss" in entry][0]
    assert abs(first["loss"] - 1.0986) < 0.05  # ln 3: an untrained head over 3 labels


def test_two_processes_train_sft_like_one(tiny_llama, tmp_path):
    # responses of 1 to 4 words: the step's loss is its response tokens' sum over the global count, so
    # averaging per-process means instead would show here
    from conftest import WORDS, toy_rows, write_jsonl

    data = tmp_path / "qa"
    data.mkdir()
    for split, count, seed in [("train", 44, 1), ("test", 6, 2)]:
        write_jsonl(data / f"{split}.jsonl", [{"sentence": row["sentence"],
                                               "answer": " ".join(WORDS[row["sentiment"]][:1 + i % 4])}
                                              for i, row in enumerate(toy_rows(count, seed))])
    recipe = {"name": "toy-sft", "task": "sft", "model": {"name": str(tiny_llama), "max_length": 32},
              "data": {"source": str(data), "prompt_template": "{sentence} is", "response_template": " {answer}"},
              "method": "full",
              "train": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32", "seed": 1,
                        "logging_steps": 1},
              "eval": {"generate": {"max_new_tokens": 2, "num_samples": 2}}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = []
    zero3 = ["train.distributed.strategy=deepspeed", "train.distributed.deepspeed=zero3"]
    fsdp = ["train.distributed.strategy=fsdp"]
    for name, extra in (("one", []), ("two", ["--nproc", "2"]), ("zero3", [*zero3, "--nproc", "2"]),
                        ("fsdp", [*fsdp, "--nproc", "2"])):
        finished = tunelab_train(str(path), "--output", str(tmp_path / name), *extra)
        assert finished.returncode == 0, finished.stderr[-3000:]
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    single, *sharded = ([(entry["loss"], entry["grad_norm"]) for entry in run["history"] if "loss" in entry]
                        for run in runs)
    for double in sharded:  # DDP, then ZeRO-3 and FSDP2 (each process holds half of the weights and optimizer state)
        assert len(single) == len(double) == 12
        for (a, norm_a), (b, norm_b) in zip(single, double, strict=True):
            assert abs(a - b) <= 1e-5 * abs(a) and abs(norm_a - norm_b) <= 1e-5 * abs(norm_a), (single, double)
    assert [run["strategy"] for run in runs] == ["single", "ddp", "deepspeed zero3", "fsdp"]
    from transformers import AutoModelForCausalLM

    for name in ("zero3", "fsdp"):  # the whole model, gathered at save: plain transformers loads it
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name / "model")
        assert sum(param.numel() for param in model.parameters()) == runs[0]["total_params"]
    # The eval loss is token-weighted: the same figure whatever the processes' blocks of rows (DDP) or with every
    # process running every pass (ZeRO-3, whose weights are sharded)
    for phase in ("before", "after"):
        for run in runs[1:]:
            assert abs(runs[0][phase]["loss"] - run[phase]["loss"]) <= 1e-5 * runs[0][phase]["loss"], (phase, runs)
            assert runs[0][phase]["exact_match"] == run[phase]["exact_match"]


def test_two_processes_train_a_stream_like_one(tiny_llama, toy_data, tmp_path):
    # data.streaming: both processes read the same seeded stream and accelerate deals each its share of every
    # batch, so each step trains on the blocks one process trains on (4 steps of 4 blocks stay within the first
    # pass over the 17 blocks of the toy sentences; at a pass's end accelerate fills the short batch up with rows
    # from the pass's first batch)
    recipe = {"name": "toy-stream", "task": "pretrain", "model": {"name": str(tiny_llama), "max_length": 32},
              "data": {"source": str(toy_data), "text": "sentence", "streaming": True}, "method": "full",
              "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, "precision": "fp32", "seed": 1,
                        "logging_steps": 1}}
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = []
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        finished = tunelab_train(str(path), "--output", str(tmp_path / name), *extra)
        assert finished.returncode == 0, finished.stderr[-3000:]
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    single, double = ([(entry["loss"], entry["grad_norm"]) for entry in run["history"] if "loss" in entry]
                      for run in runs)
    assert len(single) == len(double) == 4
    for (a, norm_a), (b, norm_b) in zip(single, double, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a) and abs(norm_a - norm_b) <= 1e-5 * abs(norm_a), (single, double)
    assert runs[1]["world_size"] == 2 and runs[1]["after"]["loss"] == pytest.approx(runs[0]["after"]["loss"],
                                                                                   rel=1e-4)
