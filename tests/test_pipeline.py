"""Chained stages (tunelab pipeline): sft → reward model → dpo from the sft run, judged by the reward model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl
from test_preference_tiny import preference_recipe, write_pairs

from tunelab.errors import TunelabError
from tunelab.pipeline import load_pipeline, run_pipeline, stage_recipes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def chain(tmp_path, tiny_llama, tiny_bert):
    """A pipeline folder: pairs, prompt/completion rows made from them, three recipes and the pipeline file."""
    pairs = write_pairs(tmp_path / "pairs")
    answers = tmp_path / "answers"
    answers.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (pairs / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(answers / f"{split}.jsonl", [{"prompt": row["prompt"], "completion": row["chosen"]}
                                                 for row in rows])
    recipes = {
        "sft.yaml": preference_recipe(tiny_llama, answers, task="sft", data={"source": str(answers),
                                                                           "chat_template": "none"},
                                      train={"epochs": 2, "batch_size": 8, "learning_rate": 3e-3,
                                             "precision": "fp32"},
                                      eval={"generate": {"max_new_tokens": 2, "num_samples": 4}}),
        "reward.yaml": preference_recipe(tiny_bert, pairs),
        "dpo.yaml": preference_recipe("replaced-by-the-pipeline", pairs, task="dpo", method={"name": "lora", "r": 8},
                                      preference={"beta": 0.5},
                                      train={"epochs": 4, "batch_size": 8, "learning_rate": 1e-2,
                                             "precision": "fp32"},
                                      eval={"generate": {"max_new_tokens": 2, "num_samples": 10}}),
    }
    for name, recipe in recipes.items():
        (tmp_path / name).write_text(yaml.safe_dump(recipe))
    return tmp_path


def write_pipeline(folder, stages: dict) -> str:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"name": "chain", "stages": stages}, sort_keys=False))
    return str(path)


def test_pipeline_runs_each_stage_from_the_earlier_ones_and_a_rerun_keeps_them(chain, tiny_llama, capsys):
    path = write_pipeline(chain, {"sft": {"recipe": "sft.yaml"}, "reward": {"recipe": "reward.yaml"},
                                  "dpo": {"recipe": "dpo.yaml", "set": {"model.name": "{sft}",
                                                                        "eval.judge.model": "{reward}"}}})
    out = chain / "out"
    results = run_pipeline(path, str(out))
    assert list(results) == ["sft", "reward", "dpo"]
    dpo = json.loads((out / "dpo" / "metrics.json").read_text())
    assert dpo["chain"] == [str(tiny_llama), str(out / "sft")], "dpo started from the sft stage's run"
    assert dpo["judge"]["source"] == str(out / "reward") and 0 <= dpo["win_rate"] <= 1
    assert dpo["after"]["preference_accuracy"] >= 0.9
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["stages"]["dpo"]["win_rate"] == dpo["win_rate"]
    finished = {name: (out / name / "metrics.json").stat().st_mtime_ns for name in results}
    capsys.readouterr()
    run_pipeline(path, str(out))
    assert capsys.readouterr().out.count("finished earlier, kept") == 3
    assert finished == {name: (out / name / "metrics.json").stat().st_mtime_ns for name in results}


@pytest.mark.parametrize(("stages", "message"), [
    ({"dpo": {"recipe": "dpo.yaml", "set": {"model.name": "{sft}"}}, "sft": {"recipe": "sft.yaml"}},
     "stage 'dpo' refers to '{sft}', which is not an earlier stage"),
    ({"sft": {"recipe": "missing.yaml"}}, "missing.yaml' does not exist"),
    ({"sft": {"recipe": "sft.yaml", "overrides": {}}}, "stages.sft.overrides: Extra inputs are not permitted"),
    ({"sft": {"recipe": "sft.yaml", "set": {"train.epoch": 3}}}, "train.epoch"),
])
def test_a_bad_pipeline_is_refused_before_any_stage_runs(chain, stages, message):
    with pytest.raises(TunelabError, match=re.escape(message)):
        run_pipeline(write_pipeline(chain, stages), str(chain / "out"))
    assert not (chain / "out").exists()


def test_the_example_pipelines_validate_and_wire_their_stages(tmp_path):
    hh = stage_recipes(load_pipeline(EXAMPLES / "rlhf_pipeline.yaml"), EXAMPLES, tmp_path)
    assert [recipe.task for recipe in hh.values()] == ["sft", "reward", "dpo"]
    assert hh["dpo"].model.name == str(tmp_path / "sft") and hh["dpo"].eval.judge.model == str(tmp_path / "reward")
    symptoms = stage_recipes(load_pipeline(EXAMPLES / "symptom_rl_pipeline.yaml"), EXAMPLES, tmp_path)
    assert symptoms["grpo"].model.name == str(tmp_path / "sft") and symptoms["sft"].data.train_size == 66
