"""Evaluation: metrics per task family and scoring a model on a dataset."""
