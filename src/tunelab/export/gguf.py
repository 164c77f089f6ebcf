"""`--format gguf`: one .gguf file for llama.cpp / Ollama (weights, tokenizer, chat template) plus a Modelfile.

Written with the `gguf` pip package alone (GGUFWriter, the tensor-name map, SpecialVocab, its numpy quantizers), so
nothing is cloned or compiled at run time. What llama.cpp's convert_hf_to_gguf.py does for the Llama and Qwen2
architectures is followed here: the same metadata keys, Llama's q/k row permutation, the GPT-2-style BPE vocabulary
with merges and the pre-tokenizer name chosen by hashing the tokenization of its check text. That script is not a
pip package (it ships with llama.cpp's sources), hence the few lines below that repeat what it does.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from tunelab.errors import TunelabError
from tunelab.export.model_card import model_card
from tunelab.export.run import RunFolder

ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2}
# --quantize choices: every type gguf.quants can write in numpy that suits a dense model (its k-quants and i-quants
# have dequantizers only; TQ1_0/TQ2_0 are ternary and MXFP4 is gpt-oss' expert format).
QUANT_TYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
               "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
               "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
               "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
               "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
               "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
               "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
               "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
DEFAULT_QUANT = "f16"

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name; convert_hf_to_gguf.py finds
# the name by hashing the token ids of this check text. The text and the hashes are llama.cpp's, for the
# tokenizers of the two supported families and the plain GPT-2 / Llama-3 ones.
PRE_TOKENIZER_CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple '
    'emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333'
    ' 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天'
    '～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!'
    "!!!?????? I've been 'told he's there, 'RE you sure? 'M not s"
    "ure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZER_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding family
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "use_regex": True}
QWEN2_SPLIT = QWEN2_PRETOKENIZE_REGEX  # Qwen2's split rule (digits one by one), as transformers' Qwen2 tokenizer has it


def check_gguf_exportable(run: RunFolder, quantize: str | None) -> str:
    """Refuse unknown quantization types and architectures before anything loads (export_run has checked that the
    task exports to gguf); return the type."""
    quantize = (quantize or DEFAULT_QUANT).lower()
    if quantize not in QUANT_TYPES:
        raise TunelabError(f"export: --quantize '{quantize}' is not available for gguf; choose one of "
                           f"{', '.join(QUANT_TYPES)} (k-quants such as Q4_K_M need llama.cpp's llama-quantize: "
                           f"the gguf package cannot write them)")
    config = json.loads((run.model_dir / "config.json").read_text(encoding="utf-8"))
    check_architecture(config.get("architectures") or [config.get("model_type", "?")])
    return quantize


def check_architecture(architectures: list[str]) -> gguf.MODEL_ARCH:
    """The GGUF architecture of a transformers one; anything else is refused naming what is supported."""
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise TunelabError(f"export: --format gguf supports the architectures {', '.join(ARCHITECTURES)} "
                       f"(e.g. smollm2-135m, qwen2.5-coder-0.5b); this run is {', '.join(architectures)} — "
                       f"use --format hf")


def write_gguf(run: RunFolder, model: torch.nn.Module, tokenizer, folder: Path, quantize: str) -> Path:
    """`<name>-<quantize>.gguf`, an Ollama Modelfile and README.md into `folder`; return the .gguf path."""
    arch = check_architecture(list(model.config.architectures or []))
    qtype, file_type = QUANT_TYPES[quantize]
    path = folder / f"{run.recipe.name}-{quantize}.gguf"
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(run.recipe.name)
    add_hyperparameters(writer, model.config, arch, file_type)
    add_vocabulary(writer, tokenizer, model.config.vocab_size)
    for name, data, data_type in gguf_tensors(model, arch, qtype):
        writer.add_tensor(name, data, raw_dtype=data_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "Modelfile").write_text(ollama_modelfile(path.name, tokenizer), encoding="utf-8")
    (folder / "README.md").write_text(model_card(run, "gguf", gguf_snippet(path.name), notes=[
        f"Weights: {quantize} (norms and other 1-D tensors stay f32, as llama.cpp's converter keeps them)."]),
        encoding="utf-8")
    return path


def add_hyperparameters(writer: gguf.GGUFWriter, config, arch: gguf.MODEL_ARCH, file_type: int) -> None:
    """The llama.cpp metadata keys for a Llama / Qwen2 config, as convert_hf_to_gguf.py writes them."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise TunelabError(f"export: rope scaling '{rope.get('rope_type', rope.get('type'))}' is not supported by "
                           f"the gguf export; export with --format hf")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)


def add_vocabulary(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """The GPT-2-style BPE vocabulary (tokens, types, merges), special token ids and the chat template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise TunelabError(f"export: the gguf export writes byte-level BPE tokenizers (Llama 3, SmolLM, Qwen2); "
                           f"this run's tokenizer is {backend['model']['type']} — use --format hf")
    tokens, token_types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, backend))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    with tempfile.TemporaryDirectory() as saved:  # SpecialVocab reads merges, ids and template from saved files
        tokenizer.save_pretrained(saved)
        gguf.SpecialVocab(saved, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id, as convert_hf_to_gguf.py's get_vocab_base builds them: ids the tokenizer
    lacks become unused [PADn] slots, added special tokens (and <|…|> ones) control tokens."""
    reverse = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def pre_tokenizer_name(tokenizer, backend: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: by llama.cpp's hash of the check text's token ids, else
    (a vocabulary llama.cpp never hashed, e.g. a retrained one) by the pre-tokenizer's own split rule."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    pre = backend.get("pre_tokenizer") or {}
    if {key: pre.get(key) for key in GPT2_PRE_TOKENIZER} == GPT2_PRE_TOKENIZER:
        return "gpt-2"  # exactly GPT-2's byte-level split
    patterns = [step.get("pattern", {}).get("Regex") for step in pre.get("pretokenizers", [])
                if step.get("type") == "Split"]
    if patterns == [QWEN2_SPLIT]:
        return "qwen2"
    raise TunelabError(f"export: llama.cpp knows no pre-tokenizer for this run's tokenizer (check hash "
                       f"{digest[:12]}…); the gguf export supports SmolLM, Qwen2, Llama-3 and GPT-2 tokenizers")


def gguf_tensors(model: torch.nn.Module, arch: gguf.MODEL_ARCH, qtype: gguf.GGMLQuantizationType):
    """(GGUF name, data, type) for every weight: q/k rows permuted for Llama, a tied output head left out (llama.cpp
    reuses token_embd), 1-D tensors in f32, and f16 where a row does not fill whole quantization blocks."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"export: no GGUF name for tensor '{hf_name}'; this model variant is not supported "
                               f"by the gguf export — use --format hf")
        data = tensor.detach().float().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            data = permute_rotary(data, heads if hf_name.endswith("q_proj.weight") else kv_heads)
        yield name, *quantize_tensor(data, qtype)


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half layout to llama.cpp's interleaved rotary pairs (the inverse
    of transformers' permutation when it converted Meta's checkpoints)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def quantize_tensor(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, int]:
    """The tensor's bytes in `qtype` (f32 for 1-D tensors; f16 when rows do not divide into blocks)."""
    if data.ndim <= 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile: the file, greedy-friendly defaults, and the stop token.

    Ollama renders prompts with Go templates; ChatML models (SmolLM2, Qwen2) get the ChatML template spelled out,
    others fall back to the raw prompt (the Jinja chat template stays inside the .gguf for llama.cpp)."""
    lines = [f"FROM ./{gguf_name}", ""]
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template:
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system', '{{ .System }}<|im_end|>', '{{ end }}',
                  '{{- range .Messages }}<|im_start|>{{ .Role }}', '{{ .Content }}<|im_end|>', '{{ end }}',
                  '<|im_start|>assistant', '"""', 'PARAMETER stop "<|im_end|>"']
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""']
    if tokenizer.eos_token and tokenizer.eos_token != "<|im_end|>":
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def gguf_snippet(gguf_name: str) -> str:
    """How to run the file, for the model card."""
    return (f"```bash\nllama-cli -m {gguf_name} -p \"your text\"          # llama.cpp\n"
            f"ollama create my-model -f Modelfile && ollama run my-model   # Ollama\n```\n\n"
            f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer  # dequantizes to fp32\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(DIR, gguf_file=\"{gguf_name}\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(DIR, gguf_file=\"{gguf_name}\")\n```")
