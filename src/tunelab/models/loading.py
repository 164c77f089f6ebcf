"""Resolve `model.name` to local weights and load them with the head a task needs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    EncoderDecoderModel,
)

from tunelab.errors import TunelabError, one_line
from tunelab.models.aliases import OFFLINE_MODELS
from tunelab.models.cache import cache_dir, publish_atomically
from tunelab.models.names import check_hub_name, check_model_name


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
    check_model_name(name)  # a local-looking name that is not there fails here, without asking the Hub
    return ModelSource(name, name, "hub")


def check_model_exists(source: ModelSource) -> None:
    """Fail fast, before any run folder exists, when a Hub model cannot be reached (in one attempt when the Hub
    cannot be: the model may still be in the local Hub cache)."""
    if source.origin != "hub":
        return
    check_hub_name(source.name)  # one attempt: an unreachable Hub fails here, not after half a minute
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


HEAD_NAMES = ("classifier", "score")  # sequence-classification heads of BERT-like and decoder models


def load_classifier(location: str, labels: list[str], tokenizer,
                    new_head: bool = False) -> tuple[torch.nn.Module, list[str]]:
    """Load a sequence classifier with a head for `labels`; return it and the names of its new modules.

    A peft adapter folder (an earlier LoRA run) is merged into its base model first, so it starts like any other
    earlier run. `new_head` re-initialises the head even when its size already fits (transfer to a new label set).
    """
    adapter = (Path(location) / "adapter_config.json").is_file()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            merged_adapter_base(location) if adapter else location, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
            output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32)
    except ValueError as exc:
        raise TunelabError(f"model '{location}' cannot classify: {one_line(exc, 200)}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    fresh = set(info["missing_keys"]) | {key for key, *_ in info.get("mismatched_keys", [])}
    fresh_modules = {key.rsplit(".", 1)[0] for key in fresh}
    if adapter:
        fresh_modules -= load_merged_adapter(model, location, keep_head=not new_head)
    if new_head:
        fresh_modules |= reinitialise_head(model)
    return model, sorted(fresh_modules)


def reinitialise_head(model: torch.nn.Module) -> set[str]:
    """Give the model a freshly initialised task head (the architecture's own init); return the head's name."""
    modules = dict(model.named_modules())
    heads = [name for name in HEAD_NAMES if name in modules]
    with torch.no_grad():
        for name in heads:
            for tensor in modules[name].parameters():
                tensor._is_hf_initialized = False  # loaded weights carry this flag, and HF's init skips them
            modules[name].apply(model._init_weights)
    return set(heads)


def merged_adapter_base(location: str) -> str:
    """The base model a peft adapter folder was trained on."""
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(location).base_model_name_or_path or ""
    if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
        raise TunelabError(f"the adapter in '{location}' was trained on '{base}', which is not here any more; "
                           f"start from a run with full weights or restore that model")
    return base


def load_merged_adapter(model: torch.nn.Module, location: str, keep_head: bool) -> set[str]:
    """Copy an earlier run's weights (its adapter merged into its base) into `model`; return the modules filled.

    The earlier head comes along only with `keep_head` and when its size fits the new label set.
    """
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(
        merged_adapter_base(location), config=AutoConfig.from_pretrained(location), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, location).merge_and_unload().state_dict()
    target = model.state_dict()
    weights = {key: value for key, value in merged.items() if key in target and value.shape == target[key].shape
               and (keep_head or key.split(".")[0] not in HEAD_NAMES)}
    model.load_state_dict(weights, strict=False)
    return {key.rsplit(".", 1)[0] for key in weights}


def is_decoder(location: str) -> bool:
    """Whether a model folder holds a causal decoder (GPT/Llama-like) rather than an encoder."""
    config = AutoConfig.from_pretrained(location)
    architectures = config.architectures or []
    return bool(getattr(config, "is_decoder", False)) or any(a.endswith("ForCausalLM") for a in architectures)


def existing_model(name: str) -> ModelSource:
    """The model `name` resolves to, refused in one line when it is not there."""
    source = resolve_model(name)
    check_model_exists(source)
    return source


def check_decoder(source: ModelSource, name: str, task: str, instead: str) -> None:
    """Refuse a model that is not a causal LM for a task that trains one (a Hub id is checked as it loads)."""
    if source.origin != "hub" and not is_decoder(source.location):
        raise TunelabError(f"task {task} trains a decoder (causal LM), but '{name}' is not one; {instead}")


def check_encoder(source: ModelSource, refusal: str) -> None:
    """Refuse a decoder (a causal LM) with `refusal` where a task needs an encoder (a Hub id is checked as it
    loads)."""
    if source.origin != "hub" and is_decoder(source.location):
        raise TunelabError(refusal)


def check_qlora_available() -> None:
    """QLoRA's 4-bit base needs CUDA and bitsandbytes; say why not, before anything runs."""
    if not torch.cuda.is_available():
        raise TunelabError("method qlora needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on CPU. Use method "
                           "lora here (the bundled GGUF models already come quantized; a LoRA run keeps optimizer "
                           "state only for the adapter)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError("method qlora needs the bitsandbytes package; pip install bitsandbytes") from None


def load_seq2seq(location: str, tokenizer):
    """An encoder-decoder as saved, or one warm-started from an encoder (both halves from its weights).

    Warm-starting (Rothe et al., 2020) gives the decoder the encoder's weights plus fresh cross-attention; the
    decoder starts generating after [CLS] and stops at [SEP], the encoder's own markers.
    """
    config = AutoConfig.from_pretrained(location)
    try:
        if config.is_encoder_decoder:
            return AutoModelForSeq2SeqLM.from_pretrained(location)
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(location, location)
    except (ValueError, OSError) as exc:
        raise TunelabError(f"cannot build an encoder-decoder from '{location}': {one_line(exc, 200)}") from None
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = start, end, tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    return model


def load_causal_lm(location: str, quantize_4bit: bool = False, sharding: dict | None = None) -> torch.nn.Module:
    """Load a decoder with its language-modelling head; an earlier run's peft adapter is merged into its base.

    `quantize_4bit` (QLoRA, CUDA only) loads the base in 4-bit NF4 with bf16 compute and prepares it for training.
    `sharding`: from_pretrained's options that shard the model over the run's processes (sharding.fsdp_loading).
    """
    from peft import PeftModel

    if quantize_4bit:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        check_qlora_available()
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(location, quantization_config=quantization, device_map={"": 0})
        return prepare_model_for_kbit_training(model)
    try:
        if (Path(location) / "adapter_config.json").is_file():
            base = AutoModelForCausalLM.from_pretrained(merged_adapter_base(location), dtype=torch.float32)
            return PeftModel.from_pretrained(base, location).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **(sharding or {}))
    except ValueError as exc:
        raise TunelabError(f"model '{location}' is not a decoder that can generate text: {one_line(exc, 200)}; "
                           f"use a causal LM (e.g. smollm2-135m)") from None


def context_length(config) -> int | None:
    """The longest sequence a model's position embeddings allow, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
