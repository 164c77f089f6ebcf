"""Load a trained classifier back from a run folder or model folder, for `predict` and `eval`.

`load_trained` routes by the run's task: classify runs hold a transformers classifier (or a peft adapter),
fewshot runs a SetFit model (sentence encoder + logistic-regression head), and a folder written by
`tunelab export --format onnx` an ONNX graph run by ONNX Runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification

from tunelab.errors import TunelabError
from tunelab.evaluation.classification import predict_probabilities
from tunelab.models.loading import load_tokenizer, merged_adapter_base
from tunelab.models.sentence_encoder import HEAD_FILE, load_trained_setfit, setfit_probabilities
from tunelab.recipe import Recipe
from tunelab.runs.folder import run_folder

ONNX_MODEL_FILE, ONNX_LABELS_FILE = "model.onnx", "labels.json"  # what `tunelab export --format onnx` writes


@dataclass
class TrainedClassifier:
    """A classifier ready to score texts, with its label names and the recipe that made it (if known)."""

    model: torch.nn.Module
    tokenizer: object
    labels: list[str]
    recipe: Recipe | None

    def probabilities(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """Class probabilities for each text (and its pair)."""
        max_length = self.recipe.model.max_length if self.recipe is not None else 256
        return predict_probabilities(self.model, self.tokenizer, texts, pairs, max_length=max_length)


@dataclass
class TrainedFewshot:
    """A SetFit model (encoder + fitted head) with its label names and the recipe that made it (if known)."""

    model: object
    labels: list[str]
    recipe: Recipe | None

    def probabilities(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """Class probabilities for each text (few-shot models take single texts)."""
        if pairs is not None:
            raise TunelabError("a few-shot model classifies single texts; score it on data without text pairs")
        return setfit_probabilities(self.model, texts, len(self.labels))


@dataclass
class TrainedOnnx:
    """An exported ONNX classifier (`tunelab export --format onnx`) run by ONNX Runtime, with its tokenizer."""

    session: object  # onnxruntime.InferenceSession
    tokenizer: object
    labels: list[str]
    inputs: list[str]
    max_length: int
    recipe: Recipe | None = None

    def probabilities(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        """Class probabilities for each text, batched by length as the PyTorch path batches them."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs else 0))
        logits = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            encoded = self.tokenizer([texts[i] for i in batch], [pairs[i] for i in batch] if pairs else None,
                                     truncation=True, max_length=self.max_length, padding=True, return_tensors="np")
            logits[batch] = self.session.run(["logits"], {name: encoded[name].astype(np.int64)
                                                          for name in self.inputs})[0]
        return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


def load_onnx_export(path: Path) -> TrainedOnnx:
    """A folder written by `tunelab export --format onnx`: model.onnx, labels.json and the tokenizer."""
    import onnxruntime

    info = json.loads((path / ONNX_LABELS_FILE).read_text(encoding="utf-8"))
    options = onnxruntime.SessionOptions()
    threads = torch.get_num_threads()  # the same thread budget torch would use (OMP_NUM_THREADS)
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path / ONNX_MODEL_FILE), options, providers=["CPUExecutionProvider"])
    return TrainedOnnx(session=session, tokenizer=load_tokenizer(str(path)), labels=list(info["labels"]),
                       inputs=list(info["inputs"]), max_length=int(info["max_length"]))


def load_trained(path: str | Path) -> TrainedClassifier | TrainedFewshot | TrainedOnnx:
    """Load a run folder, model folder or ONNX export, whichever task made it."""
    path = Path(path)
    if (path / ONNX_MODEL_FILE).is_file() and (path / ONNX_LABELS_FILE).is_file():
        return load_onnx_export(path)
    run = run_folder(path)
    model_dir = run.model_dir if run is not None else path
    if (run is not None and run.task.family == "fewshot") or (model_dir / HEAD_FILE).is_file():
        model = load_trained_setfit(model_dir)
        return TrainedFewshot(model=model, labels=list(model.labels or []), recipe=run.recipe if run else None)
    return load_trained_classifier(path)


def load_classifier_model(path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A saved sequence classifier: full weights, or a peft adapter on the base it was trained on (a PeftModel;
    `tunelab export` merges it). dtype None keeps transformers' default (the dtype the weights were saved in)."""
    path = Path(path)
    options = {"dtype": dtype} if dtype is not None else {}
    if not (path / "adapter_config.json").is_file():
        return AutoModelForSequenceClassification.from_pretrained(path, **options)
    config = AutoConfig.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(merged_adapter_base(str(path)), config=config, **options)
    return PeftModel.from_pretrained(base, path)


def load_trained_classifier(path: str | Path) -> TrainedClassifier:
    """Load `RUN_DIR` (its model/) or a model folder saved by tunelab (full weights or a peft adapter)."""
    path, recipe = Path(path), None
    run = run_folder(path)
    if run is not None:
        path, recipe = run.model_dir, run.recipe
    if not path.is_dir() or not (path / "config.json").is_file():
        raise TunelabError(f"'{path}' is not a trained model: expected a run folder (with model/) or a model folder "
                           f"with config.json; train one with `tunelab train`")
    model = load_classifier_model(path)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    has_tokenizer = (path / "tokenizer_config.json").is_file() or not (path / "adapter_config.json").is_file()
    tokenizer = load_tokenizer(str(path) if has_tokenizer else merged_adapter_base(str(path)))
    model.config.pad_token_id = tokenizer.pad_token_id
    return TrainedClassifier(model=model.eval(), tokenizer=tokenizer, labels=labels, recipe=recipe)
