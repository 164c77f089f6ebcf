"""A finished run's model, ready to use: its classifier or reward model (trained.py) and its generator
(generator.py), loaded from a run folder for predict, generate, chat, serve, export and the playground."""
