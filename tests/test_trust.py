"""Numbers a reviewer can trust and a console a person can read: honest checkpoint selection, bootstrap
intervals, the calm console, and errors that answer at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import toy_recipe

from tunelab.data.labelled import load_labelled_data
from tunelab.evaluation.uncertainty import ROWS_KEY, compare, mean_interval, paired_gain
from tunelab.recipe import DataConfig

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


# --- uncertainty ---------------------------------------------------------------------------------------------

def test_interval_of_1000_rows_at_80_percent_is_about_2_5_points_wide_each_side():
    correct = np.zeros(1000)
    correct[:800] = 1
    span = mean_interval(correct)
    half_width = (span["high"] - span["low"]) / 2
    # the normal approximation: 1.96 * sqrt(0.8 * 0.2 / 1000) = 0.0248
    assert half_width == pytest.approx(0.0248, abs=0.003)
    assert span["low"] < 0.8 < span["high"]


def classification(gold, predicted) -> dict:
    return {ROWS_KEY: {"gold": list(gold), "predicted": list(predicted)}}


def test_identical_predictions_are_no_significant_change():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 5, 200)
    predicted = np.where(rng.random(200) < 0.7, gold, rng.integers(0, 5, 200))
    result = compare(classification(gold, predicted), classification(gold, predicted), labels=5)
    for name in ("accuracy", "macro_f1"):
        gain = result["gain"][name]
        assert (gain["value"], gain["significant"]) == (0.0, False)
    assert result["gain"]["accuracy"]["p_value"] == 1.0


def test_a_clear_gain_is_significant_and_a_tiny_one_is_not():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 5, 212)
    weak = np.where(rng.random(212) < 0.4, gold, (gold + 1) % 5)
    strong = np.where(rng.random(212) < 0.9, gold, (gold + 1) % 5)
    clear = compare(classification(gold, weak), classification(gold, strong), labels=5)["gain"]["accuracy"]
    assert clear["significant"] and clear["low"] > 0.3 and clear["p_value"] < 1e-6
    one_row = strong.copy()
    one_row[np.flatnonzero(strong != gold)[0]] = gold[np.flatnonzero(strong != gold)[0]]  # one more row right
    tiny = paired_gain((np.asarray(strong == gold, float),), (np.asarray(one_row == gold, float),),
                       lambda values, axis=-1: values.mean(axis=axis))
    assert tiny["value"] == pytest.approx(1 / 212, abs=1e-6) and not tiny["significant"]


# --- selection --------------------------------------------------------------------------------------------------

def test_validation_fraction_carves_a_stratified_slice_from_train_only(toy_data):
    plain = load_labelled_data(DataConfig(source=str(toy_data), text="sentence", label="sentiment"))
    carved = load_labelled_data(DataConfig(source=str(toy_data), text="sentence", label="sentiment",
                                           validation_fraction=0.2))
    assert plain.validation is None and plain.validation_split is None
    assert (len(carved.train), len(carved.validation), len(carved.eval)) == (72, 18, 45)
    assert carved.validation_split == "train (validation 20%)"
    assert sorted(carved.validation["label"]).count(0) == 6  # 30 rows per class → 6 of each held
    assert set(carved.validation["text"]).isdisjoint(carved.train["text"])


def test_a_resolved_recipe_runs_again_on_a_source_without_a_validation_split(toy_data, tmp_path):
    """recipe.yaml writes every default out; loading it again must not turn the default split name into a demand."""
    from tunelab.recipe import load_recipe, recipe_from

    resolved = recipe_from(toy_recipe(toy_data, toy_data)).to_yaml()
    (tmp_path / "recipe.yaml").write_text(resolved)
    again = load_recipe(tmp_path / "recipe.yaml")
    assert load_labelled_data(again.data).validation is None
    named = again.data.model_copy(update={"validation_split": "dev"})
    with pytest.raises(Exception, match="data.validation_split 'dev' is not in"):
        load_labelled_data(named)


def example_recipes() -> list[tuple[str, dict]]:
    """Every example recipe, the stages of pipeline files included."""
    from tunelab.pipeline import load_pipeline, stage_recipes

    recipes = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "stages" in raw:
            for stage, recipe in stage_recipes(load_pipeline(path), path.parent, Path("runs")).items():
                recipes.append((f"{path.name}:{stage}", recipe))
        else:
            recipes.append((path.name, raw | {"name": path.stem}))
    return recipes


def test_no_example_selects_its_checkpoint_on_the_split_it_reports(monkeypatch):
    from tunelab.recipe import Recipe, validate_recipe
    from tunelab.trainer import plan_selection

    monkeypatch.setenv("TUNELAB_DATA_PATH", "/work/shared/data" if Path("/work/shared/data").is_dir()
                       else str(ROOT.parent / "shared/data"))
    from tunelab.api import load_data_for

    checked = 0
    for name, raw in example_recipes():
        recipe = raw if isinstance(raw, Recipe) else validate_recipe(raw, name)
        data = load_data_for(recipe)
        selection = plan_selection(data, recipe.eval)
        assert selection.selected_on is None or selection.selected_on != data.eval_split, name
        assert selection.rows is not data.eval or selection.selected_on is None, name
        checked += 1
    assert checked >= 14


# --- console ------------------------------------------------------------------------------------------------------

def run_cli(args: list[str], tmp_path: Path, timeout: int = 120, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with its output piped (not a terminal)."""
    environment = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=environment)


@pytest.fixture(scope="module")
def tiny_recipe_file(tiny_bert, toy_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("console") / "toy.yaml"
    raw = toy_recipe(tiny_bert, toy_data)
    raw["train"] = {**raw["train"], "epochs": 2}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_piped_two_epoch_run_prints_a_few_plain_lines(tiny_recipe_file, tmp_path):
    result = run_cli(["train", str(tiny_recipe_file), "--output", str(tmp_path / "run"),
                      "eval.each_epoch=true"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert 5 <= len(lines) <= 25, lines
    assert not any(line.lstrip().startswith("{") for line in lines), lines
    assert "\r" not in result.stdout + result.stderr
    for noise in ("Loading weights", "Writing model shards", "Warning", "it/s]"):
        assert not any(noise in line for line in lines), (noise, lines)
    assert sum("evaluated at epoch" in line for line in lines) == 2  # one line per evaluation
    assert any("after training: accuracy" in line and "[" in line for line in lines)
    assert lines[-1].endswith("report.html")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["selected_on"] is None and metrics["reported_on"] == "test"
    assert set(metrics["gain"]) == {"accuracy", "macro_f1"}


@pytest.fixture
def cli(capsys):
    """The CLI in-process (no interpreter start-up to pay for); the console's quiet switch is reset after."""
    from tunelab import console
    from tunelab.cli import main

    def run(args: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        code = main(args)
        return code, capsys.readouterr().out

    yield run
    console.set_quiet(False)


def test_json_prints_one_line_of_final_metrics(tiny_recipe_file, tmp_path, cli):
    code, out = cli(["train", str(tiny_recipe_file), "--output", str(tmp_path / "run"), "--json",
                     "data.validation_fraction=0.2"])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[-1])
    assert set(record["before"]) >= {"accuracy", "macro_f1"} and set(record["after"]) >= {"accuracy", "macro_f1"}
    assert record["task"] == "classify" and record["run"] == str(tmp_path / "run")
    assert record["selected_on"] == "train (validation 20%)" and record["reported_on"] == "test"
    assert record["intervals"]["accuracy"]["after"]["low"] <= record["after"]["accuracy"]
    assert isinstance(record["gain"]["accuracy"]["significant"], bool)


def test_quiet_prints_only_the_result_line(tiny_recipe_file, tmp_path, cli):
    code, out = cli(["train", str(tiny_recipe_file), "--output", str(tmp_path / "run"), "--quiet", "train.epochs=1"])
    assert code == 0
    assert len(out.splitlines()) == 1 and "accuracy" in out and "report:" in out


# --- errors that answer at once -----------------------------------------------------------------------------------

def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("example, expected", [
    ("grpo_symptoms.yaml", "train that run first"),
    ("symptom_rl_pipeline.yaml", "is a pipeline (stages: sft, grpo), not a recipe: run `tunelab pipeline"),
])
def test_errors_answer_in_one_line_within_5_seconds_with_the_hub_unreachable(example, expected, tmp_path):
    import time

    unreachable = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_OFFLINE": "0"}
    for command in ("validate", "train"):
        start = time.perf_counter()
        result = run_cli([command, str(ROOT / "examples" / example)], tmp_path, timeout=60, env=unreachable)
        assert time.perf_counter() - start < 5
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and expected in result.stderr


def test_a_hub_id_while_the_hub_is_unreachable_fails_at_once_with_the_offline_choices(tiny_recipe_file, tmp_path):
    import time

    start = time.perf_counter()
    result = run_cli(["validate", str(tiny_recipe_file), "model.name=someone/not-cached-model"], tmp_path,
                     timeout=60, env={"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert time.perf_counter() - start < 5
    assert result.returncode == 2 and "the Hub cannot be reached; offline choices: an alias" in result.stderr


def test_every_example_that_needs_an_earlier_run_says_so_in_its_first_line():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        text = path.read_text()
        if "runs/" in "".join(line.split("#")[0] for line in text.splitlines()):
            assert text.startswith("# Needs an earlier run:"), path.name


def test_seeds_runs_the_recipe_per_seed_into_one_folder_and_prints_mean_and_std(tiny_recipe_file, tmp_path, cli):
    code, out = cli(["train", str(tiny_recipe_file), "--seeds", "2", "--output", str(tmp_path / "seeds"),
                     "train.epochs=1"])
    assert code == 0
    runs = sorted(path.name for path in (tmp_path / "seeds" / "runs").iterdir())
    assert runs == ["full-kall-seed0", "full-kall-seed1"]
    accuracies = [json.loads((tmp_path / "seeds" / "runs" / run / "metrics.json").read_text())["after"]["accuracy"]
                  for run in runs]
    table = json.loads((tmp_path / "seeds" / "curve.json").read_text())["table"][0]
    assert table["accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert table["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert f"accuracy {np.mean(accuracies):.4f} ± {np.std(accuracies, ddof=1):.4f}" in out.splitlines()[-1]
