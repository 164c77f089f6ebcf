"""Helpers of the Studio tests: run `tunelab ui` as a real subprocess on a free loopback port, seed run folders."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

OLD = time.time() - 3600  # an hour ago: a folder last written then is not a run in progress


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StudioServer:
    """`python -m tunelab ui --runs RUNS --port PORT` in a subprocess, stopped with Ctrl-C (SIGINT) at the end."""

    def __init__(self, runs: Path, extra: list[str] | None = None, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.log = runs.parent / f"ui-{self.port}.log"
        with open(self.log, "wb") as output:  # the child keeps its own copy of the file handle
            self.process = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--runs", str(runs), "--port",
                                             str(self.port), *(extra or [])], stdout=output,
                                            stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/api/runs", timeout=5).read()
                return
            except OSError:
                assert self.process.poll() is None, self.log.read_text()
                assert time.time() < deadline, "tunelab ui did not answer within 60 s"
                time.sleep(0.2)

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.process.send_signal(2)  # SIGINT: the board interrupts a run it started, as Ctrl-C would
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def make_old(folder: Path) -> None:
    """Date every file of a folder an hour back, as if its run had ended (or died) long ago."""
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (OLD, OLD))


def seed_unfinished(finished: Path, target: Path, error: str | None = None) -> Path:
    """A copy of a finished run that never finished: no metrics.json or report; with `error`, the board's note that
    its process failed (ui_error.txt)."""
    shutil.copytree(finished, target)
    for name in ("metrics.json", "report.html", "predictions.jsonl"):
        (target / name).unlink(missing_ok=True)
    if error is not None:
        (target / "ui_error.txt").write_text(error)
    make_old(target)
    return target
