"""Run folders: where every run's recipe, metrics, logs, predictions, weights and report are written."""
