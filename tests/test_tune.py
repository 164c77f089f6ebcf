"""`tunelab tune` end to end on a tiny BERT (random weights) and the toy sentences: the reported split is read only
after the last trial, a killed study resumes, two workers share one SQLite study, workers on two "machines" share
one PostgreSQL study, bad requests are refused in one line, and the report opens in Chromium with its plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import toy_recipe
from test_ui_hardening import CHROMIUM

from tunelab.cli import main
from tunelab.data import sources
from tunelab.tune import trials as trials_module
from tunelab.tune.storage import open_storage

SPACE = {"train.learning_rate": {"log_uniform": [1.0e-3, 2.0e-2]}, "train.epochs": {"int": [1, 4]}}


def write_recipe(folder: Path, model: Path, data: Path, epochs: int = 3) -> Path:
    """The toy classify recipe (tiny BERT, full fine-tuning) and a small space beside it."""
    recipe = toy_recipe(model, data)
    recipe["train"]["epochs"] = epochs
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE), encoding="utf-8")
    return folder / "recipe.yaml"


def tune_args(folder: Path, *extra: str) -> list[str]:
    """`tunelab tune` on the toy recipe and space into folder/study."""
    return ["tune", str(folder / "recipe.yaml"), "--space", str(folder / "space.yaml"), "--output",
            str(folder / "study"), *extra]


def test_the_reported_split_is_opened_only_after_the_last_trial(tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    write_recipe(tmp_path, tiny_bert, toy_data)
    events: list[str] = []
    read_file, run_trial = sources.read_file, trials_module.run_trial

    def recording_read(path, streaming=False):
        events.append(f"read {path}")
        return read_file(path, streaming)

    def recording_trial(trial, plan, study_dir):
        try:
            return run_trial(trial, plan, study_dir)
        finally:
            events.append("trial ended")

    monkeypatch.setattr(sources, "read_file", recording_read)
    monkeypatch.setattr(trials_module, "run_trial", recording_trial)
    assert main(tune_args(tmp_path, "--trials", "4")) == 0
    reported = f"read {toy_data / 'test.jsonl'}"
    last_trial = max(i for i, event in enumerate(events) if event == "trial ended")
    assert events.count("trial ended") == 4
    assert reported in events and events.index(reported) > last_trial  # read once the search was over
    final_files = [e for e in events[:last_trial] if "/data/final/" in e]
    assert final_files == []  # no trial opened the final data either
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert study["data"]["validation"] == "train (validation 20%)" and study["data"]["validation_rows"] == 18
    assert study["counts"]["complete"] + study["counts"]["pruned"] == 4
    final = study["final"]
    assert final["reported_on"] == "test" and set(final["gain"]) == {"accuracy", "macro_f1"}
    gain = final["gain"]["accuracy"]
    assert gain["value"] == pytest.approx(final["winner"]["accuracy"] - final["yours"]["accuracy"], abs=1e-6)
    assert gain["low"] <= gain["value"] <= gain["high"]
    # the trials are judged on the 18 validation rows; the two kept models are scored on the 45 test rows
    trial = json.loads((tmp_path / "study" / "trials" / "trial-000" / "metrics.json").read_text())
    kept = json.loads((tmp_path / "study" / "final" / "winner.json").read_text())
    assert trial["eval_rows"] == 18 and len(kept["rows"]["gold"]) == 45
    assert final["models"]["yours"].startswith("trial 0 (trials/trial-000)")  # your values ran first, whole
    assert kept["scores"]["accuracy"] == final["winner"]["accuracy"]
    best = yaml.safe_load((tmp_path / "study" / "best_recipe.yaml").read_text())
    assert best["data"]["source"] == str(toy_data)  # trainable as is on the user's own data
    assert {key: best["train"][key.split(".")[1]] for key in SPACE} == final["best_values"]
    out = capsys.readouterr().out
    assert "tunelab tune: accuracy on test, your recipe → tuned: " in out


def test_a_killed_study_resumes_and_runs_the_cut_off_trial_again(tiny_bert, toy_data, tmp_path):
    write_recipe(tmp_path, tiny_bert, toy_data, epochs=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "tunelab", *tune_args(tmp_path, "--trials", "4")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cut = tmp_path / "study" / "trials" / "trial-001"
    deadline = time.time() + 120
    while not cut.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # mid-trial: its state stays "running" in the storage
    process.wait()
    assert cut.exists() and not (tmp_path / "study" / "study.json").exists()
    storage = f"sqlite:///{tmp_path / 'study' / 'optuna.db'}"
    killed = optuna.load_study(study_name="study", storage=storage).trials
    assert killed[1].state == optuna.trial.TrialState.RUNNING

    assert main(["tune", "--resume", "--output", str(tmp_path / "study")]) == 0
    trials = optuna.load_study(study_name="study", storage=storage).trials
    states = [trial.state for trial in trials]
    assert states[1] == optuna.trial.TrialState.FAIL
    retried = [trial for trial in trials if trial.user_attrs.get("retry_of") == 1]
    assert len(retried) == 1 and retried[0].params == trials[1].params
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4 and (tmp_path / "study" / "report.html").is_file()


def test_two_workers_share_one_sqlite_study_without_losing_or_repeating_a_trial(tiny_bert, toy_data, tmp_path):
    write_recipe(tmp_path, tiny_bert, toy_data, epochs=2)
    assert main(tune_args(tmp_path, "--trials", "6", "--workers", "2", "--search-only")) == 0
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    numbers = [trial["number"] for trial in study["trials"]]
    assert sorted(numbers) == list(range(6)) and study["counts"]["complete"] + study["counts"]["pruned"] == 6
    folders = sorted(path.name for path in (tmp_path / "study" / "trials").iterdir())
    assert folders == [f"trial-{n:03d}" for n in range(6)]
    values = [tuple(sorted(trial["values"].items())) for trial in study["trials"]]
    assert len(set(values)) == 6  # the two workers' samplers drew apart
    assert study["final"] is None


def test_a_queued_trial_is_taken_by_one_sqlite_worker_only(tmp_path):
    """Two workers reading the same queued trial waiting both ran it (seen in CI: both ran trial 0, one crashed).
    Worker 1 reads it waiting in its transaction; worker 2's attempt to take it waits, then finds it taken."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first, second = open_storage(url), open_storage(url)
    study = optuna.create_study(study_name="study", storage=first)
    study.enqueue_trial({"x": 1.0})
    trial_id = study.trials[0]._trial_id
    taken = []
    second_takes = threading.Thread(
        target=lambda: taken.append(second.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)))
    with first.engine.begin() as connection:
        state = connection.exec_driver_sql("SELECT state FROM trials WHERE trial_id = ?", (trial_id,)).scalar()
        assert state == "WAITING"
        second_takes.start()
        second_takes.join(timeout=1.0)
        assert second_takes.is_alive() and taken == []  # worker 2 waits for worker 1's transaction
        connection.exec_driver_sql("UPDATE trials SET state = 'RUNNING' WHERE trial_id = ?", (trial_id,))
    second_takes.join(timeout=60)
    assert taken == [False]


def test_workers_on_two_machines_join_one_postgresql_study(tiny_bert, toy_data, tmp_path, postgres_url):
    write_recipe(tmp_path, tiny_bert, toy_data, epochs=2)
    join = ["--storage", postgres_url, "--study", "shared", "--search-only"]
    assert main(tune_args(tmp_path, "--trials", "3", *join)) == 0
    other = tmp_path / "machine-2"
    other.mkdir()
    write_recipe(other, tiny_bert, toy_data, epochs=2)
    assert main(tune_args(other, "--trials", "2", *join)) == 0
    trials = optuna.load_study(study_name="shared", storage=postgres_url).trials
    assert [trial.number for trial in trials] == list(range(5))
    assert all(trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for trial in trials)
    assert len(list((other / "study" / "trials").iterdir())) == 2  # the second machine ran its own two


def test_an_sft_study_compares_the_kept_models_answers_and_refit_trains_both_again(tiny_llama, qa_data, tmp_path):
    recipe = {"name": "toy-sft", "task": "sft", "model": {"name": str(tiny_llama), "max_length": 32},
              "data": {"source": str(qa_data), "prompt_template": "{sentence} is", "response_template": " {answer}"},
              "method": "full", "train": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32"},
              "eval": {"generate": {"max_new_tokens": 3, "num_samples": 30}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"train.learning_rate": {"log_uniform": [1e-3, 1e-2]}}),
                                         encoding="utf-8")
    assert main(tune_args(tmp_path, "--trials", "2", "--metric", "exact_match")) == 0
    final = json.loads((tmp_path / "study" / "study.json").read_text())["final"]
    assert set(final["gain"]) == {"exact_match", "rouge_l"}  # the answers of both kept models, row by row
    kept = json.loads((tmp_path / "study" / "final" / "yours.json").read_text())
    assert len(kept["rows"]["exact_match"]) == 30 and kept["from"].startswith("trial 0")
    # --refit: both recipes train once more on train + validation (the last checkpoint), then report on test
    (tmp_path / "study").rename(tmp_path / "kept")
    assert main(tune_args(tmp_path, "--trials", "2", "--metric", "exact_match", "--refit")) == 0
    final = json.loads((tmp_path / "study" / "study.json").read_text())["final"]
    yours = json.loads((tmp_path / "study" / "final" / "yours" / "metrics.json").read_text())
    assert final["models"]["yours"] == "final/yours" and yours["train_rows"] == 90 and yours["eval_rows"] == 30
    assert yours["selected_on"] is None and final["yours"]["exact_match"] == yours["after"]["exact_match"]


@pytest.mark.parametrize(("space", "extra", "fragment"), [
    ({"data.eval_size": {"int": [10, 20]}}, [], "search space key 'data.eval_size' cannot be searched"),
    ({"train.epoch": {"int": [1, 2]}}, [], "search space key 'train.epoch' = 1: unknown key"),
    (SPACE, ["--storage", "nowhere"], "--storage 'nowhere' is not a storage URL"),
])
def test_a_bad_request_is_refused_in_one_line_before_any_trial(tiny_bert, toy_data, tmp_path, capsys, space, extra,
                                                                fragment):
    write_recipe(tmp_path, tiny_bert, toy_data)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space), encoding="utf-8")
    assert main(tune_args(tmp_path, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and error.count("\n") == 0
    assert not (tmp_path / "study").exists()  # nothing left behind


def test_a_source_too_small_to_carve_validation_from_is_refused(tiny_bert, tmp_path, capsys):
    data = tmp_path / "tiny-data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"sentence": "a good day", "sentiment": "good"}\n', encoding="utf-8")
    (data / "test.jsonl").write_text('{"sentence": "a bad day", "sentiment": "bad"}\n', encoding="utf-8")
    write_recipe(tmp_path, tiny_bert, data)
    assert main(tune_args(tmp_path)) == 2
    assert "too few rows to search on" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (apt-get install chromium)")
def test_the_study_report_opens_with_its_plots(tiny_bert, toy_data, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    write_recipe(tmp_path, tiny_bert, toy_data, epochs=2)
    assert main(tune_args(tmp_path, "--trials", "5")) == 0
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 2400})
        page.goto((tmp_path / "study" / "report.html").as_uri())
        page.wait_for_selector(".plot .main-svg")
        titles = page.locator("h2").all_inner_texts()
        assert titles[-4:] == ["Optimisation history", "Parameter importances", "Parallel coordinates",
                               "Validation loss per epoch, as the pruner saw it"]
        assert page.locator(".plot .js-plotly-plot").count() == 4  # each drawn by plotly.js, inlined (offline)
        assert "your recipe" in page.locator("table").first.inner_text()
        folder = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path)  # as the Studio browser tests do
        page.screenshot(path=str(folder / "tune-report.png"), full_page=True)
        browser.close()
