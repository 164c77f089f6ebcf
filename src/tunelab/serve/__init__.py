"""`tunelab serve`: an OpenAI-compatible HTTP API in front of a trained run, a model folder or an alias."""
