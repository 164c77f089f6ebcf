"""Learning curves: parsing, the method → recipe mapping, mean ± std, and a small curve on the tiny model."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml
from conftest import toy_recipe

from tunelab import api
from tunelab.cli import main
from tunelab.curve import CurvePoint, curve_recipe, parse_methods, parse_shots, point_recipe, run_curve, summarise
from tunelab.errors import TunelabError


def test_shots_parse_sorted_with_all_last():
    assert parse_shots("16,4,all,8") == [4, 8, 16, None]


@pytest.mark.parametrize(("text", "message"), [("0,4", "'0' is not a number"), ("4,x", "'x' is not a number"),
                                               ("4,4", "names '4' twice")])
def test_bad_shots_are_one_line_errors(text, message):
    with pytest.raises(TunelabError, match=message):
        parse_shots(text)


@pytest.mark.parametrize(("text", "message"), [("full,freeze:middle", "unknown method 'freeze:middle'"),
                                               ("lora,lora", "names a method twice"), (",", "is empty")])
def test_bad_methods_are_one_line_errors(text, message):
    with pytest.raises(TunelabError, match=message):
        parse_methods(text)


@pytest.fixture
def recipe_file(tiny_bert, toy_data, tmp_path):
    raw = toy_recipe(tiny_bert, toy_data, method={"name": "lora", "r": 4},
                     train={"epochs": 1, "batch_size": 16, "precision": "fp32", "logging_steps": 5},
                     fewshot={"pairs_per_example": 2, "learning_rate": 1e-3})
    del raw["name"]
    raw["data"]["train_size"] = 60
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("method", "task", "expected"), [
    ("fewshot", "fewshot", {"name": "full", "freeze_embeddings": False, "layer_lr_decay": None}),
    ("lora", "classify", {"name": "lora", "r": 4}),  # the recipe's own method keeps its options
    ("dora", "classify", {"name": "dora", "r": 16}),
    ("freeze:head", "classify", {"name": "freeze", "train_top_layers": 0}),
    ("freeze:top2", "classify", {"name": "freeze", "train_top_layers": 2}),
    ("freeze:gradual", "classify", {"name": "freeze", "unfreeze_schedule": 1}),
])
def test_each_method_becomes_a_recipe(method, task, expected, recipe_file):
    base = curve_recipe(recipe_file, [])
    recipe = point_recipe(recipe_file, [], base, CurvePoint(method, 4, 1))
    assert recipe.task == task
    assert expected.items() <= recipe.method.model_dump().items()
    assert (recipe.data.shots, recipe.data.train_size) == (4, None)
    assert (recipe.data.seed, recipe.train.seed) == (base.data.seed + 1, base.train.seed + 1)
    all_rows = point_recipe(recipe_file, [], base, CurvePoint(method, None, 0))
    assert (all_rows.data.shots, all_rows.data.train_size) == (None, 60)


def test_table_is_the_mean_and_sample_std_over_seeds():
    points = [{"method": "full", "shots": 4, "seed": s, "train_rows": 12, "accuracy": a, "macro_f1": a / 2,
               "before_accuracy": 0.3, "before_macro_f1": 0.1, "train_seconds": 2.0} for s, a in
              enumerate([0.5, 0.6, 0.7])]
    points.append({**points[0], "shots": "all", "train_rows": 90, "accuracy": 0.9})
    table = summarise(points)
    assert [(row["shots"], row["seeds"]) for row in table] == [(4, 3), ("all", 1)]
    assert table[0]["accuracy_mean"] == pytest.approx(0.6)
    assert table[0]["accuracy_std"] == pytest.approx(0.1)  # sample std of 0.5, 0.6, 0.7
    assert table[1]["accuracy_std"] == 0.0


def test_small_curve_writes_table_plot_and_runs_and_continues_without_retraining(recipe_file, tmp_path, monkeypatch):
    folder = run_curve(recipe_file, [2, None], seeds=2, methods=["fewshot", "freeze:head"],
                       output=str(tmp_path / "curve"))
    runs = sorted(path.name for path in (folder / "runs").iterdir())
    assert runs == sorted(f"{m}-k{k}-seed{s}" for m in ["fewshot", "freeze-head"] for k in [2, "all"] for s in [0, 1])
    result = json.loads((folder / "curve.json").read_text())
    assert len(result["points"]) == 8
    with open(folder / "curve.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(row["method"], row["shots"]) for row in table] == [("fewshot", "2"), ("freeze:head", "2"),
                                                                ("fewshot", "all"), ("freeze:head", "all")]
    fewshot_k2 = [p["accuracy"] for p in result["points"] if p["method"] == "fewshot" and p["shots"] == 2]
    assert float(table[0]["accuracy_mean"]) == pytest.approx(statistics.fmean(fewshot_k2), abs=1e-6)
    assert float(table[0]["accuracy_std"]) == pytest.approx(statistics.stdev(fewshot_k2), abs=1e-6)
    assert {p["train_rows"] for p in result["points"] if p["shots"] == 2} == {6}
    assert {p["train_rows"] for p in result["points"] if p["shots"] == "all"} == {60}
    seeds = [json.loads((folder / "runs" / f"fewshot-k2-seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert seeds[0]["shots"] == seeds[1]["shots"] == 2
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "mean ± sample std" in page

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(api, "train", no_training)
    assert run_curve(recipe_file, [2, None], seeds=2, methods=["fewshot", "freeze:head"], output=str(folder)) == folder
    with pytest.raises(TunelabError, match="started with other settings"):
        run_curve(recipe_file, [4], seeds=2, methods=["fewshot"], output=str(folder))


def test_seeds_draw_different_examples(recipe_file):
    base = curve_recipe(recipe_file, [])
    drawn = [api.check_recipe(point_recipe(recipe_file, [], base, CurvePoint("full", 2, seed)))[0].train["text"]
             for seed in (0, 1)]
    assert drawn[0] != drawn[1]


def test_curve_command_line_errors_are_one_line(recipe_file, capsys, tmp_path):
    assert main(["curve", str(recipe_file), "--shots", "2,two"]) == 2
    assert "'two' is not a number" in capsys.readouterr().err
    assert main(["curve", str(recipe_file), "--shots", "40", "--output", str(tmp_path / "never")]) == 2
    assert "class 'neg' has only 30 training rows" in capsys.readouterr().err
    assert not (tmp_path / "never").exists(), "checked before the curve folder is created"
