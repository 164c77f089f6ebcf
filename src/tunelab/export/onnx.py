"""`--format onnx`: an encoder classifier or reward model as one ONNX graph (dynamic batch and sequence axes), its
tokenizer and labels.json, run by ONNX Runtime; `tunelab predict DIR` reads such a folder (models/onnx_runtime.py).

torch.onnx's dynamo exporter (torch.export + onnxscript) is used: it is torch 2.13's default and keeps both axes
symbolic given `dynamic_shapes`; the output is checked against the PyTorch model before the folder is published.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError, one_line
from tunelab.export.model_card import model_card
from tunelab.export.run import write_json
from tunelab.inference.trained import ONNX_LABELS_FILE as LABELS_FILE
from tunelab.inference.trained import ONNX_MODEL_FILE as MODEL_FILE
from tunelab.runs.folder import RunFolder

OPSET = 18
CHECK_TEXTS = ["a short text", "a somewhat longer text, to check that rows of other lengths pad the same way"]


class LogitsOnly(torch.nn.Module):
    """The classifier with tensor inputs only and the logits as its one output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for a padded batch."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def check_onnx_exportable(run: RunFolder) -> None:
    """ONNX export is for encoder classifiers and reward models; decoders have the gguf and hf formats."""
    from tunelab.models.loading import is_decoder

    if is_decoder(str(run.model_dir)):  # the task exports to onnx (export_run checked): on an encoder only
        raise TunelabError(f"export: --format onnx takes {run.task.name} runs on an encoder such as minilm; "
                           f"'{run.path}' is a {run.task.name} run on a decoder — use --format hf")


def write_onnx(run: RunFolder, model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """model.onnx, the tokenizer, labels.json and README.md into `folder`."""
    max_length = run.recipe.model.max_length
    batch = tokenizer(CHECK_TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    accepted = inspect.signature(model.forward).parameters
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in batch and name in accepted]
    wrapper = LogitsOnly(model.eval())
    tensors = tuple(batch[name] for name in inputs)
    rows, columns = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tensors, str(folder / MODEL_FILE), dynamo=True, opset_version=OPSET,
                              input_names=inputs, output_names=["logits"], external_data=False, verbose=False,
                              dynamic_shapes={name: {0: rows, 1: columns} for name in inputs})
    except Exception as exc:  # torch.export and onnxscript raise many types; all mean this model did not export
        raise TunelabError(f"export: torch.onnx could not export this model: {one_line(exc, 200)}") from None
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    tokenizer.save_pretrained(folder)
    write_json(folder / LABELS_FILE, {"task": run.task.name, "labels": labels, "inputs": inputs,
                                      "max_length": max_length})
    check_same_logits(folder / MODEL_FILE, wrapper, batch, inputs)
    (folder / "README.md").write_text(model_card(run, "onnx", onnx_snippet(inputs, max_length)), encoding="utf-8")


def check_same_logits(path: Path, wrapper: torch.nn.Module, batch, inputs: list[str]) -> None:
    """Run the exported graph once in ONNX Runtime: its logits must equal PyTorch's (a broken export is never
    published)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {name: batch[name].numpy().astype(np.int64) for name in inputs})[0]
    with torch.no_grad():
        want = wrapper(*(batch[name] for name in inputs)).numpy()
    if not np.allclose(got, want, atol=1e-4):
        raise TunelabError(f"export: the ONNX graph's logits differ from PyTorch's by {np.abs(got - want).max():.2g}; "
                           f"this model does not export faithfully — use --format hf")


def onnx_snippet(inputs: list[str], max_length: int) -> str:
    """How to run the graph with ONNX Runtime alone, for the model card."""
    feed = ", ".join(f'"{name}": batch["{name}"]' for name in inputs)
    return ("```python\nimport json\n\nimport onnxruntime\nfrom transformers import AutoTokenizer\n\n"
            "session = onnxruntime.InferenceSession(\"DIR/model.onnx\")\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n"
            "labels = json.load(open(\"DIR/labels.json\"))[\"labels\"]\n"
            f"batch = tokenizer([\"your text\"], padding=True, truncation=True, max_length={max_length}, "
            f"return_tensors=\"np\")\n"
            f"logits = session.run([\"logits\"], {{{feed}}})[0]\n```\n\n"
            "Or `tunelab predict DIR \"your text\"`, which runs this folder through ONNX Runtime.")
