"""Where a study's trials are kept: Optuna's storages, chosen by a URL.

- nothing given: an SQLite file in the study folder (several worker processes on one machine share it);
- `sqlite:///…`, `postgresql://…`, `mysql://…`: Optuna's RDB storage, which workers on many machines can join;
- `journal:PATH`: Optuna's journal storage, an append-only file on a shared file system.

RDB storages keep a heartbeat: a trial whose worker died (killed, machine lost) is marked failed once its heartbeat
is older than the grace period, and run again once (Optuna's RetryHeartbeatStaleTrialCallback).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

from tunelab.errors import TunelabError, one_line

STUDY_DB = "optuna.db"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120


def storage_url(storage: str | None, study_dir: Path) -> str:
    """The storage URL of a study: the one given, or the SQLite file in the study folder."""
    return storage or f"sqlite:///{(study_dir / STUDY_DB).resolve()}"


def open_storage(url: str) -> BaseStorage:
    """Optuna's storage for `url`, or a one-line refusal naming the forms it takes."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise TunelabError(f"--storage '{url}' is not a storage URL; give sqlite:///PATH, postgresql://USER@HOST/DB, "
                           f"mysql://… or journal:PATH")
    # SQLite serialises writers: a worker waits for the lock (up to a minute) rather than failing its trial.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                             grace_period=GRACE_SECONDS,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except (SQLAlchemyError, ImportError, ValueError) as exc:  # a bad URL, a missing driver, a refused login
        raise TunelabError(f"cannot open --storage '{url}': {one_line(exc, 200)}; check the URL, that the server "
                           f"is reachable and that its Python driver is installed") from None
    if url.startswith("sqlite"):
        begin_immediate(storage.engine)
    return storage


def begin_immediate(engine: Engine) -> None:
    """Make every SQLite transaction take the write lock before its first read.

    A worker takes a queued trial (your recipe's values, a retried one) by reading it WAITING and writing RUNNING in
    one transaction, which Optuna guards with SELECT … FOR UPDATE; SQLite has no such lock, so two workers could both
    read it waiting and both run it (optuna/optuna#4002; here, two workers both ran trial 0 and one crashed). With
    BEGIN IMMEDIATE the second worker waits for the first one's commit and then reads the trial running. This is
    SQLAlchemy's own recipe for SQLite transactions (pysqlite's deferred BEGIN turned off, ours emitted instead); the
    pool is emptied so that every connection from here on is made so."""
    event.listen(engine, "connect", lambda connection, _record: setattr(connection, "isolation_level", None))
    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    engine.dispose()


def fail_orphans(storage: BaseStorage, study: optuna.Study) -> int:
    """On `--resume` of a study on this machine: the trials left running by the killed process failed; run each
    again (enqueued with its values). Returns how many."""
    orphans = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in orphans:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
    return len(orphans)
