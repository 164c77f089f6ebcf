#!/usr/bin/env bash
# The full suite (every job, each example's full schedule); extra options pass through, e.g. --samples 64.
cd "$(dirname "$0")/.." && exec .venv/bin/python -m tunelab.bench --json benchmarks/latest.json "$@"
