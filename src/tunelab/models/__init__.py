"""Models: offline aliases, resolving a model name to weights, loading with the head a task needs."""
