"""How long Studio's runs list takes with many runs: 200 copies of a small finished run's files (recipe, metrics,
log, report; not the weights) under a fresh runs folder, served by a real `tunelab ui` process; GET /api/runs is
timed cold (first call: every folder read) and warm (cached summaries, files unchanged). Target: under 1 s.

    .venv/bin/python benchmarks/ui_runs_list.py [--source RUN_DIR] [--runs 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FILES = ("recipe.yaml", "metrics.json", "log.jsonl", "report.html", "predictions.jsonl", "baseline.json")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def seed(source: Path, runs: Path, count: int) -> None:
    """`count` run folders holding copies of `source`'s files."""
    for i in range(count):
        target = runs / f"{source.name}-{i:03d}"
        target.mkdir(parents=True)
        for name in FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)


def timed_get(url: str) -> tuple[float, dict]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = json.loads(response.read())
    return time.perf_counter() - start, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="../runs-shared/minilm-full", help="a finished run folder to copy")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args()
    source = Path(args.source)
    if not (source / "metrics.json").is_file():
        sys.exit(f"--source {source} is not a finished run folder (no metrics.json)")
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        seed(source, runs, args.runs)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--runs", str(runs), "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
        try:
            url = f"http://127.0.0.1:{port}/api/runs"
            deadline = time.time() + 60
            while True:  # wait for the server with a cheap page, so the first /api/runs is a cold one
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/static/style.css", timeout=5).read()
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        sys.exit("tunelab ui did not start")
                    time.sleep(0.2)
            cold, body = timed_get(url)
            warm = [timed_get(url)[0] for _ in range(10)]
        finally:
            server.terminate()
            server.wait()
    listed = len(body["runs"])
    finished = sum(row["status"] == "finished" for row in body["runs"])
    result = {"runs": args.runs, "listed": listed, "finished": finished, "cold_seconds": round(cold, 4),
              "warm_median_seconds": round(statistics.median(warm), 4), "warm_max_seconds": round(max(warm), 4),
              "bytes": len(json.dumps(body)), "source": str(source), "cpu_count": os.cpu_count()}
    print(f"runs list of {listed} runs ({finished} finished): cold {cold * 1000:.0f} ms, warm median "
          f"{statistics.median(warm) * 1000:.0f} ms (max {max(warm) * 1000:.0f} ms); target < 1000 ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if listed == args.runs and cold < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
