"""tunelab's cache folder (dequantized GGUF models, assembled model packages) and atomic publishing into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """`$TUNELAB_CACHE/<kind>` (default ~/.cache/tunelab/<kind>), created on first use."""
    root = Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")).expanduser()
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def publish_atomically(target: Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it into place, on failure remove it.

    A killed process never leaves a half-written cache entry that a later run would trust.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staged = tmp / target.name
    if folder:
        staged.mkdir()
    try:
        yield staged
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
