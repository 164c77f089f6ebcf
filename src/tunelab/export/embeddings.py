"""Exports of an embed run: hf → the sentence-transformers folder that `SentenceTransformer(DIR)` loads; onnx →
model.onnx whose output is the sentence embedding (pooling and normalisation inside the graph), checked against the
encoder in ONNX Runtime before it is published. The classifier writers (hf.py, onnx.py) assume a task head."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError, one_line
from tunelab.export.model_card import model_card
from tunelab.export.onnx import CHECK_TEXTS, MODEL_FILE, OPSET
from tunelab.export.run import write_json
from tunelab.models.sentence_encoder import load_sentence_encoder
from tunelab.runs.folder import RunFolder

EMBEDDING_FILE = "embedding.json"  # what an onnx export writes beside model.onnx (inputs, dimension, max_length)


class SentenceEmbedding(torch.nn.Module):
    """The sentence encoder with tensor inputs only and the sentence embedding (pooled, normalised when the encoder
    normalises) as its one output: what torch.onnx exports."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings of a padded batch."""
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        return self.encoder(features)["sentence_embedding"]


def write_embeddings(run: RunFolder, folder: Path, fmt: str) -> None:
    """An embed run's export into `folder`: hf → the sentence-transformers folder that `SentenceTransformer(DIR)`
    loads; onnx → model.onnx, the tokenizer and embedding.json. Both carry README.md."""
    max_length = run.recipe.model.max_length
    encoder = load_sentence_encoder(str(run.model_dir), max_length, "embed").eval()
    if fmt == "hf":
        encoder.save_pretrained(str(folder), create_model_card=False)  # safetensors: it writes no pickle
        snippet = ("```python\nfrom sentence_transformers import SentenceTransformer\n\n"
                   "model = SentenceTransformer(DIR)\nvectors = model.encode([\"your text\"], "
                   "normalize_embeddings=True)\nsimilarities = model.similarity(vectors, vectors)\n```")
    else:
        inputs = write_embedding_onnx(encoder, folder, max_length)
        feed = ", ".join(f'"{name}": batch["{name}"]' for name in inputs)
        snippet = ("```python\nimport onnxruntime\nfrom transformers import AutoTokenizer\n\n"
                   "session = onnxruntime.InferenceSession(\"DIR/model.onnx\")\n"
                   "tokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n"
                   f"batch = tokenizer([\"your text\"], padding=True, truncation=True, max_length={max_length}, "
                   f"return_tensors=\"np\")\nvectors = session.run([\"sentence_embedding\"], {{{feed}}})[0]\n```")
    (folder / "README.md").write_text(model_card(run, fmt, snippet), encoding="utf-8")


def write_embedding_onnx(encoder, folder: Path, max_length: int) -> list[str]:
    """model.onnx (dynamic batch and sequence axes, torch.onnx's dynamo exporter as export/onnx.py uses it), the
    tokenizer and embedding.json into `folder`; the graph's embeddings are checked against `encoder.encode` in ONNX
    Runtime before anything is published. Returns the graph's input names."""
    import onnxruntime

    tokenizer = encoder.tokenizer
    batch = tokenizer(CHECK_TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in batch]
    wrapper = SentenceEmbedding(encoder.cpu())
    rows, columns = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(batch[name] for name in inputs), str(folder / MODEL_FILE), dynamo=True,
                              opset_version=OPSET, input_names=inputs, output_names=["sentence_embedding"],
                              external_data=False, verbose=False,
                              dynamic_shapes={name: {0: rows, 1: columns} for name in inputs})
    except Exception as exc:  # torch.export and onnxscript raise many types; all mean this model did not export
        raise TunelabError(f"export: torch.onnx could not export this encoder: {one_line(exc, 200)}") from None
    session = onnxruntime.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    got = session.run(["sentence_embedding"], {name: batch[name].numpy().astype(np.int64) for name in inputs})[0]
    want = encoder.encode(CHECK_TEXTS, convert_to_numpy=True, show_progress_bar=False)
    if not np.allclose(got, want, atol=1e-4):
        raise TunelabError(f"export: the ONNX graph's embeddings differ from the encoder's by "
                           f"{np.abs(got - want).max():.2g}; this encoder does not export faithfully — use --format hf")
    tokenizer.save_pretrained(folder)
    write_json(folder / EMBEDDING_FILE, {"task": "embed", "inputs": inputs, "output": "sentence_embedding",
                                         "dimension": int(got.shape[1]), "max_length": max_length,
                                         "similarity": encoder.similarity_fn_name})
    return inputs
