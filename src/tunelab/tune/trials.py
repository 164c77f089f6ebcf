"""The search itself: each trial is an ordinary `tunelab train` run on the study's search data (tune/data.py), its
values asked of Optuna; each epoch's validation score goes to Optuna's pruner, which stops a trial that is doing
worse than others did at the same epoch. One worker runs trials one after another; several workers (processes on
this machine, or other machines) share one study through its storage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
from transformers import TrainerCallback

from tunelab import api
from tunelab.console import set_quiet
from tunelab.errors import TunelabError
from tunelab.recipe import Recipe, validate_recipe
from tunelab.runs.artifacts import BASELINE_FILE
from tunelab.runs.folder import CHECKPOINTS, RECIPE_FILE, write_text_atomic
from tunelab.trainer import callbacks_for_run
from tunelab.tune.data import SEARCH, search_data
from tunelab.tune.plan import LOWER_IS_BETTER, StudyPlan
from tunelab.tune.space import parse_space, suggest, with_values
from tunelab.tune.storage import open_storage

TRIALS = "trials"
PRUNED_FILE = "pruned.json"  # a pruned trial's light summary (its checkpoints are deleted)
FAILURES = (TunelabError, RuntimeError, ValueError)  # a trial that fails so is recorded and the search goes on
SEARCH_BASELINE = "search_baseline.json"  # the untrained model's score on the validation rows, shared by trials
BASELINE_FREE = ("train.", "method.r", "method.alpha", "method.dropout", "method.target_modules",
                 "method.use_rslora", "method.loraplus_lr_ratio")


class ReportEachEpoch(TrainerCallback):
    """Give Optuna each epoch's validation loss (signed to the study's direction) and stop the trial when its
    pruner says so. The loss, not the objective: on a few dozen validation rows an early epoch's accuracy moves in
    steps of a row and ties across trials, while the loss already orders them."""

    def __init__(self, trial: optuna.Trial, recipe: Recipe, maximize: bool) -> None:
        self.trial = trial
        self.maximize = maximize
        self.every_steps = recipe.train.checkpoint_every is not None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Report the score of an evaluation during training; raise TrialPruned to end a trial Optuna prunes."""
        metrics = metrics or {}
        key = "eval_loss" if "eval_loss" in metrics else next((k for k in metrics if k.startswith("eval_")), None)
        if key is None or state.global_step == 0:  # the baseline's scoring, before any step
            return
        sign = 1.0 if (key.removeprefix("eval_") in LOWER_IS_BETTER) != self.maximize else -1.0
        step = state.global_step if self.every_steps else max(1, round(state.epoch or 0))
        self.trial.report(sign * float(metrics[key]), step)
        self.trial.set_user_attr("last_epoch", round(state.epoch or 0, 2))
        # Asking the pruner records this epoch's score at its rung; your own values' trial is asked too (its scores
        # are the yardstick the others are pruned against) but always runs whole.
        if self.trial.should_prune() and not self.trial.user_attrs.get("yours"):
            raise optuna.TrialPruned(f"pruned at {'step' if self.every_steps else 'epoch'} {step}")


def run_trial(trial: optuna.Trial, plan: StudyPlan, study_dir: Path) -> float:
    """Train one trial's recipe on the search data; its score on the validation rows."""
    values = suggest(trial, parse_space(plan.space, "space"))
    raw = search_data(with_values(plan.recipe, values), study_dir / "data", SEARCH)
    recipe = validate_recipe({**raw, "name": f"trial-{trial.number:03d}"}, source=f"trial {trial.number}")
    run_dir = study_dir / TRIALS / f"trial-{trial.number:03d}"
    trial.set_user_attr("run", str(run_dir.relative_to(study_dir)))
    trial.set_user_attr("study_dir", str(study_dir.resolve()))  # which machine's folder ran it (shared storages)
    shared = study_dir / "data" / SEARCH_BASELINE if shares_baseline(plan.space) else None
    try:
        with callbacks_for_run([ReportEachEpoch(trial, recipe, plan.maximize)]):
            _, metrics = train_with_baseline(recipe, run_dir, shared)
    except optuna.TrialPruned:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        (run_dir / PRUNED_FILE).write_text(json.dumps({"trial": trial.number, "values": values,
                                                       "last_epoch": trial.user_attrs.get("last_epoch")}),
                                           encoding="utf-8")
        raise
    score = metrics["after"].get(plan.metric)
    if not isinstance(score, int | float):
        scored = ", ".join(key for key, value in metrics["after"].items() if isinstance(value, int | float))
        raise TunelabError(f"--metric {plan.metric} is not among the trials' scores ({scored}); name one of them")
    return float(score)


def shares_baseline(space: dict) -> bool:
    """Whether every trial's untrained model scores alike, so that the first trial's baseline serves them all: the
    space changes only how training goes (train.*, a LoRA adapter's size, which starts as a no-op: B = 0)."""
    return all(key.startswith(BASELINE_FREE) and key not in ("train.precision", "method.init_lora_weights")
               for key in space)


def train_with_baseline(recipe: Recipe, run_dir: Path, shared: Path | None) -> tuple[Path, dict]:
    """`tunelab train` of one recipe into `run_dir`. With a `shared` baseline score already saved (by an earlier run
    of the same untrained model on the same rows), the run folder starts with it, as a resumed run's does (the
    stages reuse a saved baseline.json): the baseline is scored once per study, not once per trial."""
    seeded = shared is not None and shared.is_file()
    if seeded:
        run_dir.mkdir(parents=True)
        write_text_atomic(run_dir / RECIPE_FILE, recipe.to_yaml())
        shutil.copyfile(shared, run_dir / BASELINE_FILE)
    result = api.train(recipe, str(run_dir), resume=seeded)
    if shared is not None and not seeded and (run_dir / BASELINE_FILE).is_file():
        write_text_atomic(shared, (run_dir / BASELINE_FILE).read_text(encoding="utf-8"))
    return result


def sampler(plan: StudyPlan, worker: int) -> optuna.samplers.BaseSampler:
    """TPE, seeded per worker (the same seed in two workers would draw the same values), starting from a few
    random trials; trials running at once are told apart (constant liar)."""
    startup = min(10, max(3, plan.trials // 3))
    return optuna.samplers.TPESampler(seed=plan.seed + worker, n_startup_trials=startup, constant_liar=True)


class EitherPruner(optuna.pruners.BasePruner):
    """Prune when any of several Optuna pruners says so (Optuna has no such combinator; each pruner is asked, as
    successive halving records a trial's score at its rung as it answers)."""

    def __init__(self, *pruners: optuna.pruners.BasePruner) -> None:
        self.pruners = pruners

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return any([pruner.prune(study, trial) for pruner in self.pruners])


def pruner() -> optuna.pruners.BasePruner:
    """Asynchronous successive halving over epochs (rungs at epochs 1, 4, 16: a trial goes on past a rung only while
    it is in the best quarter of the trials that reached it) and, from epoch 2 on, Optuna's percentile pruner against
    the finished trials (your values' trial first): a trial whose best epoch so far is not in the top quarter of what
    the finished trials had reached by the same epoch stops there, not at the next rung. On the symptom example,
    successive halving alone (rungs 1, 3, 9) cost 3.6x one default run, three trials that led at epoch 1 with a high
    rate being pruned only at epoch 9; with the percentile check 2.4x, for the same winner. (Optuna's Hyperband runs
    several brackets, some that never prune early: it cost more still.)"""
    return EitherPruner(optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4),
                        optuna.pruners.PercentilePruner(25.0, n_startup_trials=1, n_warmup_steps=2))


def work(study_dir: Path, trials: int, worker: int = 0, threads: int | None = None) -> None:
    """One worker: run `trials` trials of the study (fewer when its timeout comes first)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan = StudyPlan.load(study_dir)
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage),
                              sampler=sampler(plan, worker), pruner=pruner())
    set_quiet(True)  # one line per trial (below), not each run's story
    try:
        study.optimize(lambda trial: run_trial(trial, plan, study_dir), n_trials=trials, timeout=plan.timeout,
                       catch=FAILURES, callbacks=[say_trial(plan)], gc_after_trial=True)
    finally:
        set_quiet(False)


def say_trial(plan: StudyPlan):
    """A study callback printing one line per finished trial."""
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        values = ", ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in trial.params.items())
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        if trial.state == optuna.trial.TrialState.COMPLETE:
            outcome = f"{plan.metric} {trial.value:.4f}"
        elif trial.state == optuna.trial.TrialState.PRUNED:
            outcome = f"pruned after epoch {trial.user_attrs.get('last_epoch', '?')}"
        else:
            outcome = "failed (see its run folder's log.jsonl)"
        print(f"tunelab tune: trial {trial.number} · {values} → {outcome} ({seconds:.0f} s)", flush=True)
    return callback
