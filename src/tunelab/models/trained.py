"""Load a trained classifier back from a run folder or model folder, for `predict` and `eval`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification

from tunelab.errors import TunelabError
from tunelab.models.loading import load_tokenizer


@dataclass
class TrainedClassifier:
    """A classifier ready to score texts, with its label names and the recipe that made it (if known)."""

    model: torch.nn.Module
    tokenizer: object
    labels: list[str]
    recipe: dict | None


def load_trained_classifier(path: str | Path) -> TrainedClassifier:
    """Load `RUN_DIR` (its model/) or a model folder saved by tunelab (full weights or a peft adapter)."""
    path = Path(path)
    recipe = None
    if (path / "recipe.yaml").is_file():
        recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8"))
        path = path / "model"
    if not path.is_dir() or not (path / "config.json").is_file():
        raise TunelabError(f"'{path}' is not a trained model: expected a run folder (with model/) or a model folder "
                           f"with config.json; train one with `tunelab train`")
    config = AutoConfig.from_pretrained(path)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if (path / "adapter_config.json").is_file():
        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        model = AutoModelForSequenceClassification.from_pretrained(base, config=config)
        model = PeftModel.from_pretrained(model, path)
        tokenizer = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tokenizer = load_tokenizer(str(path))
    model.config.pad_token_id = tokenizer.pad_token_id
    return TrainedClassifier(model=model.eval(), tokenizer=tokenizer, labels=labels, recipe=recipe)
