"""Studio's parts without a browser: the form round-trips a recipe, errors map to fields, the launcher records a
failed process in the run folder, a stopped one stays resumable, and the runs index tells statuses apart."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import yaml
from conftest import toy_recipe
from studio import make_old

from tunelab.recipe import validate_recipe
from tunelab.ui import forms
from tunelab.ui.launcher import Job, Launcher
from tunelab.ui.runs_index import RunsIndex


def test_the_form_gives_back_the_recipe_it_was_filled_from(tiny_bert, toy_data):
    recipe = validate_recipe(toy_recipe(tiny_bert, toy_data, method={"name": "lora", "r": 4,
                                                                    "target_modules": ["query", "value"]}))
    values = forms.recipe_values(recipe.model_dump(mode="json"))
    assert values["method.r"] == "4" and values["method.target_modules"] == '["query", "value"]'
    assert validate_recipe(forms.raw_recipe(values)).to_yaml() == recipe.to_yaml()


def test_every_recipe_option_is_in_the_form_with_its_help():
    fields = forms.all_fields()
    assert {"train.epochs", "train.report_to", "eval.generate.max_new_tokens", "eval.judge.model", "method.r",
            "method.num_virtual_tokens", "data.source"} <= set(fields)
    assert all(field["description"] for field in fields.values())
    assert fields["train.epochs"]["default"] == "3" and fields["task"]["choices"][0] == "classify"


def test_every_example_recipe_fills_the_form_and_pipelines_are_left_out():
    examples = Path(__file__).resolve().parents[1] / "examples"
    names = forms.example_names(examples)
    assert "symptom_to_diagnosis" in names and "rlhf_pipeline" not in names
    for name in names:
        values = forms.template_values(examples, None, "example", name)
        assert values["task"] and values["model.name"] and values["data.source"]


def test_errors_are_placed_by_the_field_they_name():
    paths = list(forms.all_fields())
    assert forms.field_of("recipe: 'train.epochs' = -1 is invalid: Input should be greater than 0", paths) == \
        "train.epochs"
    assert forms.field_of("data.text column 'x' is not in split 'train'", paths) == "data.text"
    assert forms.field_of("recipe: 'model' is required; add it to the recipe", paths) == "model.name"
    assert forms.field_of("something else entirely", paths) is None


def run_job(launcher: Launcher, run_dir: Path, code: str, stop_when: Path | None = None) -> Job:
    """Run `code` as the launcher runs a job; with stop_when, stop it (SIGINT) once that file exists."""
    job = Job(1, run_dir, [sys.executable, "-c", code], run_dir.parent / "job.log")
    if stop_when is None:
        launcher._run(job)
        return job
    import threading

    worker = threading.Thread(target=launcher._run, args=(job,))
    worker.start()
    deadline = time.monotonic() + 60
    while not stop_when.exists() and time.monotonic() < deadline:  # a loaded machine starts Python slowly
        time.sleep(0.05)
    job.stop_requested = True
    job.process.send_signal(signal.SIGINT)
    worker.join(30)
    return job


def test_a_failed_process_leaves_its_output_tail_and_the_run_shows_failed(tmp_path):
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    (runs / "r" / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "task": "classify"}))
    launcher = Launcher(runs)
    job = run_job(launcher, runs / "r", "import sys; print('error: data.text column missing'); sys.exit(2)")
    assert job.state == "failed" and job.returncode == 2
    assert "error: data.text column missing" in (runs / "r" / "ui_error.txt").read_text()
    index = RunsIndex(runs)
    assert index.summaries(set(), launcher.ended)[0]["status"] == "failed"


def test_a_stopped_process_is_interrupted_not_failed(tmp_path):
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    (runs / "r" / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "task": "classify"}))
    launcher = Launcher(runs)
    ready = tmp_path / "ready"
    # a job as tunelab's CLI starts one: SIGINT heard even where the parent ignored it (a shell's background job)
    code = (f"import pathlib, sys, time\nfrom tunelab.cli import accept_interrupts\naccept_interrupts()\n"
            f"pathlib.Path({str(ready)!r}).touch()\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            f"    sys.exit(130)")
    job = run_job(launcher, runs / "r", code, stop_when=ready)
    assert job.state == "stopped" and job.returncode != 0
    assert not (runs / "r" / "ui_error.txt").exists()
    index = RunsIndex(runs)
    assert index.summaries(set(), launcher.ended)[0]["status"] == "interrupted"
    assert index.summaries({runs / "r"}, {})[0]["status"] == "running"


def test_a_folder_written_a_moment_ago_by_another_process_counts_as_running(tmp_path):
    runs = tmp_path / "runs"
    (runs / "fresh").mkdir(parents=True)
    (runs / "fresh" / "recipe.yaml").write_text("name: fresh\n")
    (runs / "fresh" / "log.jsonl").write_text('{"step": 1, "time": 1.0}\n')
    (runs / "old").mkdir()
    (runs / "old" / "recipe.yaml").write_text("name: old\n")
    make_old(runs / "old")
    (runs / ".studio").mkdir()  # the board's own folder is not a run
    statuses = {row["name"]: row["status"] for row in RunsIndex(runs).summaries(set(), {})}
    assert statuses == {"fresh": "running", "old": "interrupted"}


def test_a_taken_port_is_one_error_line():
    import socket

    import pytest

    from tunelab.errors import TunelabError
    from tunelab.ui.app import check_port_free

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(TunelabError, match=f"cannot listen on 127.0.0.1:{port}.*pass another --port"):
            check_port_free("127.0.0.1", port)


def test_an_optional_section_at_its_defaults_is_left_out_and_filled_in_is_kept():
    from tunelab.ui.forms import all_fields, raw_recipe

    values = {path: field["default"] or "" for path, field in all_fields().items()
              if not path.startswith("method.") or path == "method.name"}
    assert "replay" not in raw_recipe(values)["data"]  # its template/split/fraction defaults alone ask for nothing
    values["data.replay.source"] = "self_instruct"
    assert raw_recipe(values)["data"]["replay"] == {"source": "self_instruct"}


def test_the_form_offers_each_task_only_its_own_sections():
    schema = forms.form_schema()
    own = {task: {field["path"] for section in sections for field in section["fields"]}
           for task, sections in schema["tasks"].items()}
    assert own["classify"] == set() and own["sft"] == set()
    assert own["dpo"] == {"preference.loss", "preference.beta", "preference.simpo_gamma"}
    assert own["kto"] == {"preference.beta", "preference.desirable_weight", "preference.undesirable_weight"}
    assert {"reward.function", "grpo.num_generations"} <= own["grpo"] and "fewshot.epochs" in own["fewshot"]
    shared = {field["path"] for section in schema["sections"] for field in section["fields"]}
    assert not shared & set().union(*own.values())  # no task's own field among the shared sections


def test_a_field_left_over_from_another_task_is_not_sent(tiny_bert, toy_data):
    """Switching the form from dpo to classify leaves dpo's preference fields behind: they are not the recipe's."""
    recipe = validate_recipe(toy_recipe(tiny_bert, toy_data))
    values = {**forms.recipe_values(recipe.model_dump(mode="json")), "preference.loss": "ipo"}
    assert "preference" not in forms.raw_recipe(values)
    assert validate_recipe(forms.raw_recipe(values)).to_yaml() == recipe.to_yaml()
