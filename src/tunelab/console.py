"""What a run prints: a few plain lines a person reads, one training bar, and nothing from the libraries.

The Trainer's own output (a dict per log step, a nested bar per evaluation) and the loading/saving bars of
transformers bury the lines that matter, so tunelab replaces HF's progress callbacks with `TrainingProgress` and
turns library bars off. On a terminal the bar redraws one line with a carriage return; anywhere else (CI, a pipe,
a file) it prints a plain line at each quarter of training instead. `--quiet` and `--json` silence all of it but
the result. Library warnings are not shown; they go to the run's log.jsonl as events. (The bar itself is a
TrainerCallback, in trainer.py: this module stays free of heavy imports, for the CLI.)
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

_state = {"quiet": False, "log": None, "pending": []}


def set_quiet(quiet: bool) -> None:
    """Silence every line but the result (`--quiet`, `--json`)."""
    _state["quiet"] = quiet


def is_quiet() -> bool:
    """Whether only the result is printed."""
    return bool(_state["quiet"])


def interactive() -> bool:
    """Whether output goes to a terminal (a redrawn bar) rather than a pipe or file (plain lines)."""
    return sys.stdout.isatty()


def say(text: str) -> None:
    """Print one line of a run's story, unless quiet."""
    if not _state["quiet"]:
        print(text, flush=True)


def capture_warnings() -> None:
    """Route Python warnings away from the console into the run's log.jsonl (held until the run folder exists)."""

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        event = {"time": round(time.time(), 3), "warning": str(message), "category": category.__name__,
                 "where": f"{Path(filename).name}:{lineno}"}
        if _state["log"] is None:
            _state["pending"].append(event)
        else:
            write_event(event)

    warnings.showwarning = record


def log_to(path: Path) -> None:
    """Send captured warnings to this log.jsonl from now on, starting with those held so far."""
    _state["log"] = path
    for event in _state["pending"]:
        write_event(event)
    _state["pending"].clear()


def write_event(event: dict) -> None:
    """Append one event to the current log.jsonl."""
    with open(_state["log"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(event, ensure_ascii=False) + "\n")


def format_seconds(seconds: float) -> str:
    """'42 s', '3m05s', '1h02m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def signed(value: float, spec: str = ".3f") -> str:
    """A change with its sign, a true minus sign for a negative one: '+0.009', '−0.005'."""
    return format(value, "+" + spec).replace("-", "\N{MINUS SIGN}")


def percent(ratio: float) -> str:
    """A ratio (after / before) as a signed percentage change: 1.19 → '+19%'."""
    return signed(100 * (ratio - 1), ".0f") + "%"

