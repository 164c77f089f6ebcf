"""Experiment tracking (`train.report_to`): the Trainer's own logs go to the trackers the user named (HF's
callbacks), and tunelab adds what only it knows once a run finished: the before/after metrics and the resolved
recipe, to MLflow (params + metrics + recipe.yaml) and TensorBoard (scalars + the recipe as text).

Offline-friendly defaults: MLflow writes a SQLite store inside the run folder (`mlflow.db`, artifacts in
`mlartifacts/`) unless MLFLOW_TRACKING_URI names another; TensorBoard event files go to `<run>/tensorboard`.
With `report_to: []` (the default) nothing here runs and no file is written.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tunelab.errors import TunelabError

TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
# tracker → (module that must import, the pip command that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
            "mlflow": ("mlflow", "pip install mlflow-skinny sqlalchemy alembic"),
            "trackio": ("trackio", "pip install trackio"),
            "wandb": ("wandb", "pip install wandb")}
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_RUN_ID_FILE = "mlflow_run_id.txt"  # a resumed run keeps logging into the same MLflow run
DEFAULT_EXPERIMENT = "tunelab"
_tensorboard_dir_set: str | None = None  # the TENSORBOARD_LOGGING_DIR this process set (not the user)


def check_trackers(report_to: list[str]) -> None:
    """Refuse, before anything is written, a tracker whose package is not installed, with the command to fix it."""
    for tracker in report_to:
        module, install = PACKAGES[tracker]
        if importlib.util.find_spec(module) is None:
            raise TunelabError(f"train.report_to lists {tracker}, but its package '{module}' is not installed; "
                               f"install it with `{install}` (or `pip install 'tunelab[tracking]'` for tensorboard "
                               f"and mlflow), or drop {tracker} from train.report_to")


def prepare_trackers(run_dir: Path, report_to: list[str]) -> None:
    """Point the trackers at the run folder before the Trainer starts (its callbacks read this when training
    begins): TensorBoard's event folder, and an MLflow run this module opens, so that the Trainer's logs and
    tunelab's summary land in one MLflow run."""
    global _tensorboard_dir_set
    if "tensorboard" in report_to:
        current = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if current is None or current == _tensorboard_dir_set:  # the user's own setting wins
            _tensorboard_dir_set = str(run_dir / TENSORBOARD_DIR)
            os.environ["TENSORBOARD_LOGGING_DIR"] = _tensorboard_dir_set
    if "mlflow" in report_to:
        start_mlflow_run(run_dir)


def start_mlflow_run(run_dir: Path) -> None:
    """Open (or, for a resumed run, reopen) this run's MLflow run in the run folder's store or the user's."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run()
    local = "MLFLOW_TRACKING_URI" not in os.environ
    if local:
        mlflow.set_tracking_uri(f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:  # artifacts beside the store, not in ./mlruns of whatever folder tunelab ran in
        artifacts = (run_dir / "mlartifacts").resolve().as_uri() if local else None
        experiment_id = mlflow.create_experiment(name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    saved = run_dir / MLFLOW_RUN_ID_FILE
    if saved.is_file():
        mlflow.start_run(run_id=saved.read_text().strip())
        return
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_dir.name)
    saved.write_text(run.info.run_id)


def flat_params(values: dict, prefix: str = "") -> dict[str, str]:
    """A nested recipe as `section.key` → value text (MLflow params are flat strings)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = "null" if value is None else str(value)
    return flat


def summary_metrics(metrics: dict) -> dict[str, float]:
    """tunelab's scalar results: before_X and after_X for each metric, the win rate and the training speed."""
    scalars = {f"{phase}_{key}": float(value) for phase in ("before", "after")
               for key, value in (metrics.get(phase) or {}).items()
               if isinstance(value, int | float) and not isinstance(value, bool)}
    for key in ("win_rate", "train_samples_per_second", "train_seconds", "trainable_params"):
        if isinstance(metrics.get(key), int | float):
            scalars[key] = float(metrics[key])
    return scalars


def log_summary(run_dir: Path, recipe, metrics: dict) -> None:
    """After a finished run: its before/after metrics and resolved recipe to each tracker that takes them."""
    report_to = recipe.train.report_to
    if "mlflow" in report_to:
        import mlflow

        if mlflow.active_run() is None:
            start_mlflow_run(run_dir)
        mlflow.log_params({f"recipe.{key}": value for key, value in flat_params(recipe.model_dump(mode="json"))
                           .items()})
        mlflow.log_metrics(summary_metrics(metrics))
        mlflow.log_text(recipe.to_yaml(), "recipe.yaml")
        mlflow.end_run()
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR / "summary"))
        for key, value in summary_metrics(metrics).items():
            writer.add_scalar(f"tunelab/{key}", value, 0)
        writer.add_text("tunelab/recipe", f"```\n{recipe.to_yaml()}\n```", 0)
        writer.close()
