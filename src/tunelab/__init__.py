"""tunelab: fine-tune pretrained transformers on your own data, with honest before/after evaluation."""

__version__ = "0.1.0"
