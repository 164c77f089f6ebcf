"""The postgres_url fixture gives a real PostgreSQL server, private to the session and on loopback only, that two
Optuna processes can share one study through, as the machines of `tunelab tune --storage postgresql://...` do."""

from __future__ import annotations

import subprocess
import sys
from itertools import pairwise

import optuna
import sqlalchemy

TRIALS_PER_WORKER = 10
# One worker: joins the study by name, waits for the other at a barrier of files (so that their trials overlap
# rather than one worker finishing while the other still imports optuna), runs its trials, tags each with its id.
WORKER = """
import pathlib, sys, time, optuna
url, name, trials, worker, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], pathlib.Path(sys.argv[5])
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name=name, storage=url, load_if_exists=True)
(barrier / worker).touch()
deadline = time.time() + 60
while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.01)
def objective(trial):
    trial.set_user_attr("worker", worker)
    x = trial.suggest_float("x", -10, 10)
    time.sleep(0.05)
    return (x - 2) ** 2
study.optimize(objective, n_trials=trials)
"""


def test_the_server_is_postgresql_on_loopback_only(postgres_url):
    """The URL reaches a PostgreSQL server that listens on 127.0.0.1 alone; the plain postgresql:// form a user
    types for --storage (SQLAlchemy 2.1 picks psycopg 3 for it) reaches it too."""
    assert postgres_url.startswith("postgresql+psycopg://")
    plain = sqlalchemy.make_url(postgres_url).set(drivername="postgresql")
    for url in (postgres_url, plain):
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text("SELECT version()")).scalar().startswith("PostgreSQL ")
            assert connection.execute(sqlalchemy.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
            assert connection.execute(sqlalchemy.text("SELECT current_database()")).scalar() == "tunelab"
        engine.dispose()


def test_two_processes_share_one_study_without_losing_a_trial(postgres_url, tmp_path):
    """Two Optuna processes running the same study at once leave exactly 2N complete trials, numbered 0..2N-1 once
    each, N from each process, their trials interleaved."""
    name = "shared-study"
    # The schema first: two processes creating Optuna's tables in an empty database at once collide
    # (UniqueViolation on pg_type_typname_nsp_index; optuna/optuna#1092), so one process creates them.
    optuna.create_study(study_name=name, storage=postgres_url)
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, name, str(TRIALS_PER_WORKER), worker,
                                 str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for worker in ("a", "b")]
    try:
        for worker in workers:
            output, _ = worker.communicate(timeout=120)
            assert worker.returncode == 0, output
    finally:
        for worker in workers:  # a worker that hangs or outlives a failed one is not left behind
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials(deepcopy=False)
    assert len(trials) == 2 * TRIALS_PER_WORKER
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert sorted(trial.number for trial in trials) == list(range(2 * TRIALS_PER_WORKER))
    assert len({trial._trial_id for trial in trials}) == 2 * TRIALS_PER_WORKER
    by_worker = [trial.user_attrs["worker"] for trial in sorted(trials, key=lambda trial: trial.number)]
    assert by_worker.count("a") == by_worker.count("b") == TRIALS_PER_WORKER
    switches = sum(first != second for first, second in pairwise(by_worker))
    assert switches > 1, f"the workers ran one after the other, not at once: {''.join(by_worker)}"
