"""`tunelab tune`, top to bottom: check the recipe and the space, write the study's data (its reported split
unread), run the trials on one or more workers, then train the winner and the user's own recipe once each on the
final data and compare them on the reported split with a paired interval. The study folder:

    tune.json          the study's settings (every worker and a resumed study read them)
    optuna.db          the trials (Optuna's SQLite storage, unless --storage names another)
    data/              the search and final data (tune/data.py)
    trials/trial-NNN/  each trial: an ordinary run folder (a pruned one keeps its recipe, log and pruned.json)
    best_recipe.yaml   your recipe with the winning values: `tunelab train best_recipe.yaml`
    final/yours/, final/winner/   the two final runs
    study.json, report.html
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from tunelab import api
from tunelab.console import log_to, say
from tunelab.errors import TunelabError
from tunelab.evaluation.uncertainty import ROWS_KEY
from tunelab.recipe import Recipe, read_raw_recipe, slug, validate_recipe
from tunelab.runs.folder import METRICS_FILE, PER_ROW_FILE, write_json_atomic, write_text_atomic
from tunelab.tune.data import FINAL, SEARCH, DataLayout, prepare_search_data, search_data, write_reported_rows
from tunelab.tune.plan import StudyPlan
from tunelab.tune.results import compare_final_runs, study_summary
from tunelab.tune.space import check_space, default_space, read_space, space_as_yaml, values_in, with_values
from tunelab.tune.storage import fail_orphans, open_storage, storage_url
from tunelab.tune.trials import shares_baseline, train_with_baseline, work

BEST_RECIPE = "best_recipe.yaml"
LOG_FILE = "log.jsonl"
STUDY_FILE = "study.json"
FINAL_RUNS = "final"
FINAL_BASELINE = "final_baseline.json"  # the untrained model's score on the reported rows, shared by both final runs
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class TuneRequest:
    """What the command line asked for."""

    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    trials: int = 16
    space: str | None = None
    timeout: float | None = None
    workers: int = 1
    storage: str | None = None
    study: str | None = None
    output: str | None = None
    resume: bool = False
    metric: str | None = None
    refit: bool = False
    search_only: bool = False


def tune(request: TuneRequest) -> tuple[Path, dict]:
    """Run a study (or resume one); return its folder and study.json's content."""
    started = time.time()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tunelab prints its own line per trial
    study_dir, plan, layout = resume_study(request) if request.resume else start_study(request)
    log_to(study_dir / LOG_FILE)  # the study's own warnings; each trial's go to its run folder
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage))
    left = plan.trials - trials_run_here(study, study_dir)
    say(f"tunelab tune: {plan.study_name} · {left} of {plan.trials} trials to run on {plan.workers} worker(s) · "
        f"optimising validation {plan.metric} ({layout.validation}, {layout.validation_rows} rows; "
        f"{layout.train_rows} train rows) → {study_dir}")
    run_workers(study_dir, left, plan.workers)
    log_to(study_dir / LOG_FILE)
    if request.search_only:
        summary = study_summary(plan, study_dir, layout, None, time.time() - started)
        write_json_atomic(study_dir / STUDY_FILE, summary)
        return study_dir, summary
    final = final_runs(plan, study_dir, layout)
    summary = study_summary(plan, study_dir, layout, final, time.time() - started)
    write_json_atomic(study_dir / STUDY_FILE, summary)
    from tunelab.tune.report import write_study_report

    write_study_report(study_dir, plan, summary)
    return study_dir, summary


def trials_run_here(study: optuna.Study, study_dir: Path) -> int:
    """How many of this folder's --trials are done: finished, pruned, or failed for good (a trial cut off by a kill
    is run again, so it does not count). Other machines' trials in a shared storage are theirs to count."""
    trials = study.get_trials(deepcopy=False)
    retried = {trial.user_attrs.get("retry_of") for trial in trials}
    here = str(study_dir.resolve())
    return sum(1 for trial in trials if trial.user_attrs.get("study_dir") == here and (
        trial.state in FINISHED or (trial.state == optuna.trial.TrialState.FAIL and trial.number not in retried)))


def start_study(request: TuneRequest) -> tuple[Path, StudyPlan, DataLayout]:
    """Check everything that can be checked, write the study's data and settings, create the Optuna study."""
    if request.recipe is None:
        raise TunelabError("tunelab tune needs a recipe (or --resume --output STUDY_DIR)")
    raw = read_raw_recipe(request.recipe, list(request.overrides))
    recipe = validate_recipe(raw, source=request.recipe)
    space = read_space(request.space) if request.space else default_space(recipe)
    check_space(raw, space)
    if request.trials < 1 or request.workers < 1:
        raise TunelabError("--trials and --workers need at least 1")
    study_dir = Path(request.output) if request.output else Path(recipe.output.root) / \
        f"{recipe.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    if study_dir.exists():
        raise TunelabError(f"study folder '{study_dir}' already exists; choose a new --output, or add --resume to "
                           f"continue that study")
    study_dir.mkdir(parents=True)
    try:
        return study_dir, *create_study(request, raw, recipe, space, study_dir)
    except BaseException:
        shutil.rmtree(study_dir, ignore_errors=True)  # nothing of the user's in it yet
        raise


def create_study(request: TuneRequest, raw: dict, recipe: Recipe, space: dict, study_dir: Path
                 ) -> tuple[StudyPlan, DataLayout]:
    """Write the study's data and settings into its new folder and create (or join) the Optuna study."""
    layout = prepare_search_data(recipe, study_dir / "data")
    api.check_recipe(validate_recipe(search_data(raw, study_dir / "data", SEARCH)))  # model, columns
    plan = StudyPlan(recipe_path=str(request.recipe), recipe=raw, space=space_as_yaml(space),
                     metric=request.metric or recipe.entry.searched_on, study_name=request.study or study_dir.name,
                     storage=storage_url(request.storage, study_dir), trials=request.trials,
                     timeout=request.timeout, workers=request.workers, refit=request.refit, seed=recipe.train.seed)
    plan.save(study_dir)
    write_text_atomic(study_dir / "space.yaml", yaml.safe_dump(plan.space, sort_keys=False))
    study = optuna.create_study(study_name=plan.study_name, storage=open_storage(plan.storage),
                                direction=plan.direction, load_if_exists=True)
    if not study.trials:  # your own values first: the search starts from them, and study.json shows their score
        study.enqueue_trial(values_in(recipe, space), user_attrs={"yours": True})
    return plan, layout


def resume_study(request: TuneRequest) -> tuple[Path, StudyPlan, DataLayout]:
    """Reopen a killed study: its settings and data as they were; trials it left running are run again."""
    if request.output is None:
        raise TunelabError("--resume needs --output STUDY_DIR naming the study to continue")
    study_dir = Path(request.output)
    plan = StudyPlan.load(study_dir)
    if request.refit and not plan.refit:  # the same search, its winner compared once more the refit way
        plan.refit = True
        plan.save(study_dir)
    recipe = validate_recipe(plan.recipe, source=plan.recipe_path)
    layout = prepare_search_data(recipe, study_dir / "data")
    storage = open_storage(plan.storage)
    study = optuna.load_study(study_name=plan.study_name, storage=storage)
    if plan.storage == storage_url(None, study_dir):  # this machine's own file: nothing else runs its trials
        retried = fail_orphans(storage, study)
        if retried:
            say(f"tunelab tune: {retried} trial(s) were cut off by the kill; they run again")
    return study_dir, plan, layout


def run_workers(study_dir: Path, trials: int, workers: int) -> None:
    """Run `trials` trials over `workers` processes (this one when 1), the cores split between them."""
    if trials <= 0:
        return
    if workers == 1:
        work(study_dir, trials)
        return
    shares = [trials // workers + (1 if index < trials % workers else 0) for index in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    processes = [context.Process(target=work, args=(study_dir, share, index, threads), name=f"tune-worker-{index}")
                 for index, share in enumerate(shares) if share]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [process.name for process in processes if process.exitcode != 0]
    if failed:
        raise TunelabError(f"{', '.join(failed)} stopped with an error (see above); continue the study with "
                           f"--resume --output {study_dir}")


def final_runs(plan: StudyPlan, study_dir: Path, layout: DataLayout) -> dict:
    """Score the winner and your recipe on the reported split (read now, for the first time) and compare them row
    by row. Kept as trained (the default): the two trials' own models, where the task can score a finished run on
    new rows (classify); otherwise, or with --refit, each recipe trained once more on the final data."""
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage))
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in
              optuna.trial.TrialState}
    if not counts["complete"]:
        raise TunelabError(f"no trial finished ({counts['pruned']} pruned, {counts['fail']} failed); raise --trials "
                           f"or --timeout, or widen the space")
    best = study.best_trial
    winner_raw = with_best_values(plan, best.params)
    write_text_atomic(study_dir / BEST_RECIPE, yaml.safe_dump(winner_raw, sort_keys=False, allow_unicode=True))
    recipe = validate_recipe(plan.recipe, source=plan.recipe_path)
    write_reported_rows(recipe, study_dir / "data", layout)
    recipes = {name: final_recipe(raw, study_dir, plan.refit, name) for name, raw in (("yours", plan.recipe),
                                                                                       ("winner", winner_raw))}
    yours = next((trial for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                  if trial.user_attrs.get("yours")), None)
    rescore = getattr(recipe.entry.stage(), "score_finished_run", None)  # classify, sft: (run, recipe) → scores
    found = f"tunelab tune: best trial {best.number} ({plan.metric} {best.value:.4f} on validation)"
    if not plan.refit and rescore is not None and yours is not None:
        say(f"{found}; scoring its model and that of trial {yours.number} (your values), as trained, on "
            f"{layout.reported}")
        outcomes = kept_outcomes(rescore, study_dir, {"yours": yours, "winner": best}, recipes)
        if outcomes is not None:
            return compare_final_runs(best, outcomes, layout.reported)
    say(f"{found}; training it and your recipe once more on {'train + validation' if plan.refit else 'train'}, "
        f"reported on {layout.reported}")
    shared = study_dir / "data" / FINAL_BASELINE if shares_baseline(plan.space) else None
    runs = {"yours": final_run(recipes["yours"], study_dir / FINAL_RUNS / "yours", shared)}
    same = recipes["winner"].model_copy(update={"name": "yours"}).to_yaml() == recipes["yours"].to_yaml()
    if same:  # your own values won: one run stands for both (a second would repeat it bit for bit)
        say("tunelab tune: your recipe's own values won the search; no second final run")
    runs["winner"] = runs["yours"] if same else final_run(recipes["winner"], study_dir / FINAL_RUNS / "winner",
                                                          shared)
    return compare_final_runs(best, {name: run_outcome(run, study_dir) for name, run in runs.items()},
                              layout.reported)


def kept_outcomes(rescore, study_dir: Path, trials: dict[str, optuna.trial.FrozenTrial],
                  recipes: dict[str, Recipe]) -> dict[str, dict] | None:
    """Each trial's model, as trained, scored on the reported split (final/<name>.json keeps the scores); None
    when the task's stage cannot score a finished run so."""
    outcomes = {}
    for name, trial in trials.items():
        scores = rescore(study_dir / trial.user_attrs["run"], recipes[name])
        if scores is None:
            return None
        trained = json.loads((study_dir / trial.user_attrs["run"] / METRICS_FILE).read_text(encoding="utf-8"))
        outcomes[name] = {"from": f"trial {trial.number} ({trial.user_attrs['run']}), as trained",
                          "run": trial.user_attrs["run"], "retention": (trained.get("retention") or {}).get("summary"),
                          "scores": {key: value for key, value in scores.items() if key not in (ROWS_KEY, "labels")},
                          "rows": scores.get(ROWS_KEY), "labels": scores.get("labels")}
        write_json_atomic(study_dir / FINAL_RUNS / f"{name}.json", outcomes[name])
    return outcomes


def run_outcome(run_dir: Path, study_dir: Path) -> dict:
    """A final run's scores on the reported split, with its per-row record."""
    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    rows = json.loads((run_dir / PER_ROW_FILE).read_text(encoding="utf-8"))["after"] \
        if (run_dir / PER_ROW_FILE).is_file() else None
    return {"from": str(run_dir.relative_to(study_dir)), "run": str(run_dir.relative_to(study_dir)),
            "retention": (metrics.get("retention") or {}).get("summary"), "scores": metrics["after"], "rows": rows,
            "labels": metrics.get("labels")}


def with_best_values(plan: StudyPlan, params: dict) -> dict:
    """Your recipe as written, with the winning values set (and its name marked as tuned)."""
    raw = with_values(plan.recipe, params)
    raw["name"] = slug(f"{raw.get('name', 'recipe')}-tuned")
    return raw


def final_recipe(raw: dict, study_dir: Path, refit: bool, name: str) -> Recipe:
    """A final run's recipe: on data/final (train; validation picks the checkpoint), or with refit on train +
    validation together (the last checkpoint is the result)."""
    data_dir = study_dir / "data"
    recipe_raw = search_data(raw, data_dir, FINAL)
    if refit:
        refit_dir = data_dir / "final-refit"
        if not (refit_dir / "train.jsonl").is_file():
            refit_dir.mkdir(parents=True, exist_ok=True)
            rows = [(data_dir / FINAL / part).read_text(encoding="utf-8") for part in ("train.jsonl",
                                                                                       "validation.jsonl")]
            write_text_atomic(refit_dir / "train.jsonl", "".join(text if text.endswith("\n") else text + "\n"
                                                                 for text in rows))
            shutil.copyfile(data_dir / FINAL / "test.jsonl", refit_dir / "test.jsonl")
        recipe_raw["data"] = {**recipe_raw["data"], "source": str(refit_dir), "validation_split": None}
    return validate_recipe({**recipe_raw, "name": name}, source=f"final run '{name}'")


def final_run(recipe: Recipe, run_dir: Path, shared: Path | None) -> Path:
    """Train one final run (a finished one is kept; an interrupted one resumes; the baseline scored once)."""
    if (run_dir / METRICS_FILE).is_file():
        return run_dir
    if run_dir.exists():
        api.train(recipe, str(run_dir), resume=True)
    else:
        train_with_baseline(recipe, run_dir, shared)
    return run_dir
