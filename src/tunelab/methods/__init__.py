"""Methods: how a model's weights are trained (full, freeze, peft adapters). Model in, model out."""
