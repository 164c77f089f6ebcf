"""Runs `tunelab train` for the board: one process at a time (a CPU machine trains one run well, not two), the
rest queued. Only `tunelab train` on a recipe tunelab validated is ever started, as an argument list (no shell).
Every path the board writes is built from a run name and checked to lie inside the runs folder (the recipe schema
already allows only slug names; this is the second guard).

Stop sends SIGINT, which tunelab turns into "interrupted; resume with … --resume" (its checkpoints stay), then
SIGTERM if the process has not ended after a grace period. Resume is the same command plus `--output RUN --resume`.
A process that ends with an error (not stopped) leaves the tail of its output in the run folder's ui_error.txt.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.recipe import Recipe
from tunelab.runs.folder import write_text_atomic
from tunelab.ui.runs_index import UI_ERROR_FILE
from tunelab.ui.security import inside

STUDIO_FOLDER = ".studio"  # inside the runs folder: the recipes the board queued and its processes' output
STOP_GRACE_SECONDS = 30.0
ERROR_TAIL_CHARS = 4000


@dataclass
class Job:
    """One queued or running `tunelab train`."""

    id: int
    run_dir: Path
    argv: list[str]
    output: Path
    state: str = "queued"  # queued → running → finished | failed | stopped
    process: subprocess.Popen | None = None
    returncode: int | None = None
    stop_requested: bool = False
    error: str | None = None

    def public(self) -> dict:
        """What the pages show of a job."""
        return {"id": self.id, "run": self.run_dir.name, "state": self.state, "returncode": self.returncode,
                "error": self.error}


@dataclass
class Launcher:
    """The queue and the one running process; a worker thread starts the next job when the last one ends."""

    runs_dir: Path
    python: str = sys.executable
    jobs: deque[Job] = field(default_factory=deque)
    current: Job | None = None
    history: list[Job] = field(default_factory=list)
    ended: dict[Path, float] = field(default_factory=dict)  # run folder → when the board's process on it ended
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _closing: bool = False

    def start(self) -> None:
        """Start the worker thread."""
        threading.Thread(target=self._work, name="tunelab-ui-launcher", daemon=True).start()

    def submit_new(self, recipe: Recipe) -> Job:
        """Queue a new run of a validated recipe into a fresh folder `<runs>/<name>-<time>`."""
        job_id = next(self._ids)
        studio = self.runs_dir / STUDIO_FOLDER
        recipe_file = inside(studio / "recipes" / f"{recipe.name}-{int(time.time())}-{job_id}.yaml", self.runs_dir)
        run_dir = inside(self.fresh_run_dir(recipe.name), self.runs_dir)
        write_text_atomic(recipe_file, recipe.to_yaml())
        return self._queue(job_id, run_dir, ["train", str(recipe_file), "--output", str(run_dir)])

    def submit_resume(self, run_dir: Path) -> Job:
        """Queue `tunelab train RUN/recipe.yaml --output RUN --resume` for an interrupted or failed run."""
        from tunelab.recipe import load_recipe

        run_dir = inside(run_dir, self.runs_dir)
        load_recipe(run_dir / "recipe.yaml")  # the saved recipe must still validate (raises TunelabError)
        if self.job_for(run_dir) is not None:
            raise TunelabError(f"run '{run_dir.name}' is already queued or running")
        (run_dir / UI_ERROR_FILE).unlink(missing_ok=True)  # the board's own note of the last failure
        return self._queue(next(self._ids), run_dir, ["train", str(run_dir / "recipe.yaml"), "--output",
                                                      str(run_dir), "--resume"])

    def fresh_run_dir(self, name: str) -> Path:
        """`<runs>/<name>-<timestamp>`, never an existing or queued folder."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        queued = {job.run_dir for job in self.jobs} | ({self.current.run_dir} if self.current else set())
        for suffix in itertools.count():
            path = self.runs_dir / (f"{name}-{stamp}" + (f"-{suffix}" if suffix else ""))
            if not path.exists() and path not in queued:
                return path
        raise AssertionError("unreachable")

    def _queue(self, job_id: int, run_dir: Path, arguments: list[str]) -> Job:
        output = self.runs_dir / STUDIO_FOLDER / "logs" / f"job-{job_id}.log"
        job = Job(job_id, run_dir, [self.python, "-m", "tunelab", *arguments], output)
        with self._lock:
            self.jobs.append(job)
        self._wake.set()
        return job

    def job_for(self, run_dir: Path) -> Job | None:
        """The queued or running job of a run folder."""
        with self._lock:
            candidates = [*self.jobs, *([self.current] if self.current else [])]
        return next((job for job in candidates if job.run_dir == run_dir), None)

    def active_runs(self) -> set[Path]:
        """Run folders the board is training now."""
        current = self.current
        return {current.run_dir} if current and current.state == "running" else set()

    def queued_runs(self) -> set[Path]:
        """Run folders waiting for their turn."""
        with self._lock:
            return {job.run_dir for job in self.jobs}

    def stop(self, run_dir: Path) -> Job:
        """Take a queued run off the queue, or interrupt the running one so that it can be resumed."""
        job = self.job_for(run_dir)
        if job is None:
            raise TunelabError(f"run '{run_dir.name}' is not running or queued")
        with self._lock:
            if job in self.jobs:
                self.jobs.remove(job)
                job.state = "stopped"
                self.history.append(job)
                return job
        job.stop_requested = True
        if job.process is not None and job.process.poll() is None:
            job.process.send_signal(signal.SIGINT)
            threading.Timer(STOP_GRACE_SECONDS, self._terminate, args=(job,)).start()
        return job

    def _terminate(self, job: Job) -> None:
        if job.process is not None and job.process.poll() is None:
            job.process.terminate()

    def state(self) -> dict:
        """The running job, the queue and the jobs that ended, for the pages."""
        with self._lock:
            return {"current": self.current.public() if self.current else None,
                    "queued": [job.public() for job in self.jobs],
                    "ended": [job.public() for job in self.history[-20:]]}

    def close(self) -> None:
        """Stop the running process (so that it can be resumed later) and empty the queue."""
        self._closing = True
        with self._lock:
            self.jobs.clear()
        current = self.current
        if current and current.process and current.process.poll() is None:
            current.stop_requested = True
            current.process.send_signal(signal.SIGINT)
            try:
                current.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                current.process.terminate()
        self._wake.set()

    def _work(self) -> None:
        while not self._closing:
            self._wake.wait()
            with self._lock:
                job = self.jobs.popleft() if self.jobs else None
                if job is None:
                    self._wake.clear()
                    continue
                self.current = job
            self._run(job)
            with self._lock:
                self.history.append(job)
                self.current = None

    def _run(self, job: Job) -> None:
        job.output.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(job.output, "wb") as output:
            job.process = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=output,
                                           stderr=subprocess.STDOUT, env=env, start_new_session=True)
            job.state = "running"
            job.returncode = job.process.wait()
        self.ended[job.run_dir] = time.time()
        if job.returncode == 0:
            job.state = "finished"
        elif job.stop_requested:
            job.state = "stopped"
        else:
            job.state = "failed"
            job.error = output_tail(job.output)
            if job.run_dir.is_dir():
                write_text_atomic(job.run_dir / UI_ERROR_FILE, job.error)


def output_tail(path: Path) -> str:
    """The last lines of a process's output (progress-bar redraws collapsed to their last state)."""
    text = path.read_bytes()[-4 * ERROR_TAIL_CHARS:].decode("utf-8", errors="replace")
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(lines)[-ERROR_TAIL_CHARS:]
