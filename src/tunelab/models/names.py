"""Checks of `model.name` that answer at once, before the training stack loads: a name written as a local path
that is not there, and a Hub id while the Hub cannot be reached.

Asked for a missing name, huggingface_hub retries with back-off for about half a minute before it fails; a new
user who typed `runs/symptom_sft` before training that run waited that long for "not found". This module is light
(no torch, no transformers), so `tunelab validate` and `train` can run it first.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from tunelab.errors import TunelabError

HUB_PROBE_SECONDS = 3.0
OFFLINE_CHOICES = ("an alias (`tunelab models` lists them and which are installed), a model folder, a .gguf file or "
                   "an earlier run folder")


def looks_local(name: str) -> bool:
    """A name written as a path (./x, /x, ~/x, a/b/c, x.gguf, runs/x, or one whose first folder exists here)."""
    if name.startswith((".", "/", "~", "runs/")) or name.count("/") > 1 or name.endswith(".gguf"):
        return True
    parts = Path(name).parts
    return "/" in name and bool(parts) and Path(parts[0]).is_dir()


def hub_reachable() -> bool:
    """Whether the Hub endpoint (HF_ENDPOINT) accepts a connection within HUB_PROBE_SECONDS, in one attempt
    (never, when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def hub_cached(name: str) -> bool:
    """Whether a Hub model's config is in the local Hub cache (usable offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # a malformed id: not cached
        return False


def check_model_name(name: str) -> None:
    """Raise at once for a local-looking name that does not exist (an earlier run not trained yet says so)."""
    from tunelab.models.aliases import OFFLINE_MODELS

    path = Path(name).expanduser()
    if name in OFFLINE_MODELS or path.exists() or not looks_local(name):
        return
    earlier_run = Path(name).parts[0] == "runs" or name.startswith("./runs/")
    hint = (f"it names an earlier run that is not there yet: train that run first (e.g. `tunelab train RECIPE "
            f"--output {name}`), or " if earlier_run else "")
    raise TunelabError(f"model.name '{name}' does not exist; {hint}give an existing folder, run folder or .gguf "
                       f"file, a Hub id, or an alias ({', '.join(OFFLINE_MODELS)})")


def check_model_answers_at_once(name: str) -> None:
    """Both checks, for `validate` and `train` to run before the training stack loads."""
    check_model_name(name)
    check_hub_name(name)


def check_hub_name(name: str) -> None:
    """Raise at once, listing the offline choices, for a Hub id while the Hub cannot be reached (unless cached)."""
    from tunelab.models.aliases import OFFLINE_MODELS

    if name in OFFLINE_MODELS or Path(name).expanduser().exists() or looks_local(name):
        return
    if not hub_reachable() and not hub_cached(name):
        raise TunelabError(f"model.name '{name}' is not an alias, a local folder or a cached Hub model, and the Hub "
                           f"cannot be reached; offline choices: {OFFLINE_CHOICES}")
