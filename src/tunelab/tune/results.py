"""What a study found: the final comparison (winner against your recipe, row by row on the reported split) and
study.json's summary of every trial."""

from __future__ import annotations

from pathlib import Path

import optuna

from tunelab.evaluation import HEADLINE_METRICS
from tunelab.evaluation.uncertainty import ROWS_KEY, compare, describe_gain
from tunelab.tune.data import DataLayout
from tunelab.tune.plan import StudyPlan


def compare_final_runs(best: optuna.trial.FrozenTrial, outcomes: dict[str, dict], reported_on: str) -> dict:
    """Both sides' scores on the reported split and the winner's gain over yours, each metric with its paired 95%
    interval (the same rows scored by both models). `outcomes`: yours / winner → from (where the model came from),
    scores, rows (the per-row record), labels."""
    yours, winner = outcomes["yours"], outcomes["winner"]
    labels = winner.get("labels")
    paired = compare({ROWS_KEY: yours["rows"]}, {ROWS_KEY: winner["rows"]}, len(labels) if labels else None) \
        if yours["rows"] and winner["rows"] else {}
    scores = {name: {key: value for key, value in outcome["scores"].items() if key in HEADLINE_METRICS}
              for name, outcome in outcomes.items()}
    gain = paired.get("gain", {})
    return {
        "best_trial": best.number, "best_values": best.params, "best_validation_score": best.value,
        "reported_on": reported_on, "models": {name: outcome["from"] for name, outcome in outcomes.items()},
        "runs": {name: outcome["run"] for name, outcome in outcomes.items()},  # run folders, in the study folder
        "retention": {name: outcome["retention"] for name, outcome in outcomes.items() if outcome["retention"]},
        "yours": scores["yours"], "winner": scores["winner"],
        "intervals": {metric: {"yours": ends["before"], "winner": ends["after"]}
                      for metric, ends in paired.get("intervals", {}).items()},
        "gain": gain,
        "verdict": {metric: verdict(scores["yours"][metric], scores["winner"][metric], gain[metric])
                    for metric in gain},
    }


def verdict(yours: float, winner: float, gain: dict) -> str:
    """'0.8726 → 0.8915 (+0.0189 [+0.005, +0.033])', or with 'no significant change' when the interval holds 0."""
    return f"{yours:.4f} → {winner:.4f}{describe_gain(gain)}"


def study_summary(plan: StudyPlan, study_dir: Path, layout: DataLayout, final: dict | None, wall: float) -> dict:
    """study.json: the settings, the data layout, each trial (values, state, score, run folder, seconds), the
    counts and wall time, and the final comparison."""
    from dataclasses import asdict

    from tunelab.tune.storage import open_storage

    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage))
    complete = optuna.trial.TrialState.COMPLETE
    trials = [{"number": trial.number, "state": trial.state.name.lower(), "values": trial.params,
               "score": trial.value if trial.state == complete else None,
               "last_epoch": trial.user_attrs.get("last_epoch"), "run": trial.user_attrs.get("run"),
               "yours": bool(trial.user_attrs.get("yours")),
               "seconds": round(trial.duration.total_seconds(), 1) if trial.duration else None}
              for trial in study.trials]
    counts = {state: sum(1 for trial in trials if trial["state"] == state) for state in
              ("complete", "pruned", "fail", "running", "waiting")}
    return {"study": plan.study_name, "storage": plan.storage, "metric": plan.metric, "direction": plan.direction,
            "recipe": plan.recipe_path, "space": plan.space, "data": asdict(layout), "refit": plan.refit,
            "counts": counts, "trials_seconds": round(sum(trial["seconds"] or 0 for trial in trials), 1),
            "wall_seconds": round(wall, 1), "final": final, "trials": trials}
