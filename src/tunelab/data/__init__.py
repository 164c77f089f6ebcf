"""Data: where a dataset comes from, how its rows are checked, and how they are sampled."""
