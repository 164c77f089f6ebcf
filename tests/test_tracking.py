"""train.report_to: a tiny run logged to MLflow and TensorBoard, read back with each tracker's own reader."""

from __future__ import annotations

import json

import pytest
from conftest import toy_recipe

from tunelab import api
from tunelab.errors import TunelabError
from tunelab.recipe import validate_recipe
from tunelab.runs import tracking

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def test_mlflow_and_tensorboard_get_the_run_its_metrics_and_recipe(tiny_bert, toy_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    recipe = toy_recipe(tiny_bert, toy_data)
    recipe["train"].update(epochs=3, report_to=["mlflow", "tensorboard"])
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / "tracked"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tunelab")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["recipe.train.learning_rate"] == str(recipe["train"]["learning_rate"])
    assert run.data.params["recipe.model.name"] == str(tiny_bert)
    assert run.data.metrics["before_accuracy"] == pytest.approx(metrics["before"]["accuracy"])
    assert run.data.metrics["after_accuracy"] == pytest.approx(metrics["after"]["accuracy"])
    losses = client.get_metric_history(run.info.run_id, "loss")  # the Trainer's own logs, in the same run
    assert [m.value for m in losses] == pytest.approx([h["loss"] for h in metrics["history"] if "loss" in h])
    assert (run_dir / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    loss = [event.value for event in events.Scalars("train/loss")]
    assert loss == pytest.approx([h["loss"] for h in metrics["history"] if "loss" in h], rel=1e-5)
    summary = EventAccumulator(str(run_dir / "tensorboard" / "summary")).Reload()
    assert summary.Scalars("tunelab/after_accuracy")[0].value == pytest.approx(metrics["after"]["accuracy"])
    assert json.loads((run_dir / "metrics.json").read_text())["after"] == metrics["after"]


def test_no_trackers_by_default_means_no_tracker_files(tiny_bert, toy_data, tmp_path):
    recipe = toy_recipe(tiny_bert, toy_data)
    recipe["train"].update(epochs=1)
    run_dir, _ = api.train(validate_recipe(recipe), str(tmp_path / "plain"))
    assert validate_recipe(recipe).train.report_to == []
    assert not {"tensorboard", "mlflow.db", "mlartifacts", "mlflow_run_id.txt"} & {p.name for p in run_dir.iterdir()}


def test_a_missing_tracker_package_is_refused_before_training_with_the_pip_command(tiny_bert, toy_data, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else object())
    recipe = toy_recipe(tiny_bert, toy_data)
    recipe["train"]["report_to"] = ["wandb"]
    with pytest.raises(TunelabError, match=r"train.report_to lists wandb.*`pip install wandb`"):
        api.train(validate_recipe(recipe), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    recipe["train"]["report_to"] = ["neptune"]
    with pytest.raises(TunelabError, match="train.report_to"):
        validate_recipe(recipe)
