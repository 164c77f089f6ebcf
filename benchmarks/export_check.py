"""Check `tunelab export` on finished runs: hf exports against tunelab itself, gguf exports against the hf export.

    PYTHONPATH=src TUNELAB_DATA_PATH=../shared/data .venv/bin/python benchmarks/export_check.py \
        --sft runs/smollm2-sft-lora --classifier runs/minilm-lora [--work /tmp/export-check]

1. hf: each run is exported with `tunelab export --format hf`; a fresh Python process that imports only
   transformers (and torch) loads the folder. Its greedy answers to 5 test prompts must equal `tunelab generate`
   (same batch, same bf16 autocast where tunelab uses it), its class probabilities on 20 test texts equal
   `tunelab predict` within 1e-4.
2. gguf: the sft run is exported at f16 and q8_0 and read back by transformers' GGUF loader (in a fresh process);
   next-token top-1 over every position of the 5 prompts is compared with the hf export. When llama-cpp-python is
   importable (it builds llama.cpp from source: ~20 min on 2 cores; `pip install --target DIR llama-cpp-python
   diskcache` and put DIR on PYTHONPATH), llama.cpp also answers the 5 prompts greedily from each file, through
   the chat template inside it.
Prints one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = "gretelai/symptom_to_diagnosis"

FRESH_GENERATE = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, bf16 = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer.padding_side = "left"
texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
         for p in prompts]
batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
    out = model.generate(**batch, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
answers = [a.strip() for a in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
print(json.dumps({"answers": answers, "imported": sorted(m for m in ("peft", "tunelab") if m in sys.modules)}))
"""

FRESH_CLASSIFY = r"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts, max_length = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
with torch.no_grad():
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    probabilities = model(**batch).logits.softmax(-1)
labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
print(json.dumps({"probabilities": probabilities.tolist(), "labels": labels,
                  "imported": sorted(m for m in ("peft", "tunelab") if m in sys.modules)}))
"""

FRESH_TOP1 = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, gguf_file, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
kwargs = {"gguf_file": gguf_file} if gguf_file else {}
tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
rows = []
for prompt in prompts:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        rows.append({"ids": ids[0].tolist(), "top1": model(ids).logits[0].argmax(-1).tolist()})
print(json.dumps(rows))
"""


def fresh(script: str, *args: str) -> dict | list:
    """Run `script` in a new interpreter (no tunelab on its path) and parse its last stdout line as JSON."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
                                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_test_texts(count: int) -> list[str]:
    """input_text of the first `count` test rows of symptom_to_diagnosis (through TUNELAB_DATA_PATH)."""
    for folder in os.environ.get("TUNELAB_DATA_PATH", "").split(":"):
        path = Path(folder) / "symptom_to_diagnosis" / "test.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return [row["input_text"] for row in rows[:count]]
    raise SystemExit("symptom_to_diagnosis/test.jsonl not found on TUNELAB_DATA_PATH")


def check_sft(run: Path, work: Path, prompts: list[str]) -> dict:
    """hf export of an sft run against `tunelab generate`; gguf f16 / q8_0 against the hf export."""
    import yaml

    from tunelab import api
    from tunelab.models.precision import bf16_supported

    recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    template = recipe["data"]["prompt_template"]
    field = template[template.index("{") + 1:template.index("}")]
    hf = api.export(str(run), str(work / "sft-hf"))
    tunelab_answers = api.generate(str(run), prompts)
    rendered = [template.format(**{field: text}) for text in prompts]
    plain = fresh(FRESH_GENERATE, str(hf), json.dumps(rendered), "1" if bf16_supported() else "0")
    result = {"hf_generate": {"equal": plain["answers"] == tunelab_answers, "bf16_autocast": bf16_supported(),
                              "answers_equal": sum(a == b for a, b in zip(plain["answers"], tunelab_answers,
                                                                          strict=True)),
                              "prompts": len(prompts), "imported_in_fresh_process": plain["imported"],
                              "tunelab": tunelab_answers, "fresh": plain["answers"]}}
    reference = fresh(FRESH_TOP1, str(hf), "", json.dumps(rendered))
    for quantize in ("f16", "q8_0"):
        folder = api.export(str(run), str(work / f"sft-gguf-{quantize}"), "gguf", quantize)
        gguf_file = next(folder.glob("*.gguf"))
        got = fresh(FRESH_TOP1, str(folder), gguf_file.name, json.dumps(rendered))
        same_ids = all(a["ids"] == b["ids"] for a, b in zip(got, reference, strict=True))
        agree = sum(int(x == y) for a, b in zip(got, reference, strict=True) for x, y in zip(a["top1"], b["top1"],
                                                                                           strict=False))
        positions = sum(len(row["top1"]) for row in reference)
        result[f"gguf_{quantize}"] = {"file": gguf_file.name, "mib": round(gguf_file.stat().st_size / 2**20, 1),
                                      "same_token_ids_from_gguf_tokenizer": same_ids, "positions": positions,
                                      "top1_agreement": round(agree / positions, 4),
                                      **llama_cpp_answers(gguf_file, rendered, tunelab_answers)}
    return result


def llama_cpp_answers(gguf_file: Path, prompts: list[str], want: list[str]) -> dict:
    """Greedy answers of llama.cpp (llama-cpp-python) from the file, through its own chat template; {} without it."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {}
    llm = Llama(model_path=str(gguf_file), n_ctx=1024, n_threads=1, verbose=False)
    answers = [llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=64, temperature=0.0,
                                          top_k=1)["choices"][0]["message"]["content"].strip() for prompt in prompts]
    return {"llama_cpp_pre_tokenizer": llm.metadata.get("tokenizer.ggml.pre"),
            "llama_cpp_answers_equal_to_tunelab": sum(a == b for a, b in zip(answers, want, strict=True)),
            "llama_cpp_answers": answers}


def check_classifier(run: Path, work: Path, texts: list[str]) -> dict:
    """hf export of a classifier run against `tunelab predict` probabilities."""
    import yaml

    from tunelab import api
    from tunelab.inference.trained import load_trained

    recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    hf = api.export(str(run), str(work / "classifier-hf"))
    trained = load_trained(run)
    want = trained.probabilities(texts)
    plain = fresh(FRESH_CLASSIFY, str(hf), json.dumps(texts), str(recipe["model"]["max_length"]))
    got = np.array(plain["probabilities"])
    return {"hf_predict": {"texts": len(texts), "max_abs_diff": float(np.abs(got - want).max()),
                           "same_labels": plain["labels"] == trained.labels,
                           "same_argmax": int((got.argmax(-1) == want.argmax(-1)).sum()),
                           "imported_in_fresh_process": plain["imported"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", type=Path, help="finished sft run folder (chat template, prompt template)")
    parser.add_argument("--classifier", type=Path, help="finished classify run folder")
    parser.add_argument("--work", type=Path, help="new folder for the exports (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="export-check-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"work": str(work)}
    if args.classifier:
        results["classifier"] = check_classifier(args.classifier, work, load_test_texts(20))
    if args.sft:
        results["sft"] = check_sft(args.sft, work, load_test_texts(5))
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
