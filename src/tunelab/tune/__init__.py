"""tunelab tune: hyperparameter search on Optuna (issue 29, in progress)."""
