"""Stages: one module per task, each reading top to bottom like a recipe."""
