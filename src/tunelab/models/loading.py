"""Resolve `model.name` to local weights and load them with the head a task needs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tunelab.errors import TunelabError, one_line
from tunelab.models.aliases import OFFLINE_MODELS
from tunelab.models.cache import cache_dir, publish_atomically


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: a local HF folder (possibly a dequantized GGUF) or a Hub id."""

    name: str  # what the recipe said
    location: str  # folder path or Hub id that from_pretrained takes
    origin: str  # alias | folder | gguf | run | hub


def resolve_model(name: str) -> ModelSource:
    """Turn an alias, folder, run folder, GGUF file or Hub id into a from_pretrained location."""
    if name in OFFLINE_MODELS:
        path = OFFLINE_MODELS[name].path()
        return ModelSource(name, str(gguf_to_folder(path) if path.suffix == ".gguf" else path), "alias")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, str(gguf_to_folder(path)), "gguf")
    if path.is_dir():
        if (path / "recipe.yaml").is_file() and (path / "model").is_dir():
            return ModelSource(name, str(path / "model"), "run")
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return ModelSource(name, str(path), "folder")
        raise TunelabError(f"model.name folder '{name}' holds no config.json (not a model folder or run folder)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix == ".gguf":
        raise TunelabError(f"model.name '{name}' does not exist; give an existing folder or .gguf file, "
                           f"a Hub id, or an alias ({', '.join(OFFLINE_MODELS)})")
    return ModelSource(name, name, "hub")


def check_model_exists(source: ModelSource) -> None:
    """Fail fast, before any run folder exists, when a Hub model cannot be reached."""
    if source.origin != "hub":
        return
    try:
        AutoConfig.from_pretrained(source.location)
    except Exception as exc:  # offline, unknown id, gated: the fix is the same
        raise TunelabError(f"model.name '{source.name}' is not an alias ({', '.join(OFFLINE_MODELS)}), not a local "
                           f"path, and could not be fetched from the Hub ({one_line(exc, 140)}); "
                           f"run `tunelab models` for offline choices") from None


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder keyed by the file's hash, and return it.

    transformers dequantizes GGUF to fp32 on every load (17-57 s); reloading the saved folder takes 0.1 s.
    """
    digest = file_sha256(gguf)
    folder = cache_dir("gguf") / digest[:16]
    if (folder / "config.json").is_file():
        return folder
    with publish_atomically(folder, folder=True) as staged:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            # The weights are plain fp32 now, but the GGUF quantizer flag makes Trainer and save_pretrained refuse.
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "tunelab_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
        del model
    return folder


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_tokenizer(location: str):
    """Load a tokenizer and give it a pad token when it has none (decoders), so batches can be padded."""
    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_classifier(location: str, labels: list[str], tokenizer) -> tuple[torch.nn.Module, list[str]]:
    """Load a sequence classifier with a head for `labels`; return it and the names of its new modules."""
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, output_loading_info=True,
            ignore_mismatched_sizes=True, dtype=torch.float32)
    except ValueError as exc:
        raise TunelabError(f"model '{location}' cannot classify: {one_line(exc, 200)}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    fresh = set(info["missing_keys"]) | {key for key, *_ in info.get("mismatched_keys", [])}
    return model, sorted({key.rsplit(".", 1)[0] for key in fresh})
