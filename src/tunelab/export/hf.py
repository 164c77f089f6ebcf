"""`--format hf`: a self-contained Hugging Face folder (safetensors, config, tokenizer, model card) that plain
`AutoModelFor….from_pretrained(DIR)` loads without tunelab or peft: adapters are merged into the base."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.export.model_card import model_card
from tunelab.export.run import HEAD_FAMILIES
from tunelab.runs.folder import RunFolder

PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth", ".pickle")


def save_hf_folder(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """Weights as safetensors, config, generation config and tokenizer (with its chat template) into `folder`."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    pickles = [path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES]
    if pickles:  # a guard on the promise "safetensors only": a library change that adds a pickle must not ship
        raise TunelabError(f"export: saving wrote pickled files {pickles}; this transformers version is not "
                           f"supported for export")


def write_hf(run: RunFolder, model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """The hf export: the merged model, tokenizer and README.md model card."""
    save_hf_folder(model, tokenizer, folder)
    (folder / "README.md").write_text(model_card(run, "hf", hf_snippet(run, tokenizer)), encoding="utf-8")


def hf_snippet(run: RunFolder, tokenizer) -> str:
    """How to load and use the folder with transformers alone, for the model card."""
    family = run.task.family
    if family in HEAD_FAMILIES:
        use = ("probabilities = model(**batch).logits.softmax(-1)  # labels: model.config.id2label"
               if family == "classifier" else "reward = model(**batch).logits[:, 0]  # higher = preferred")
        return ("```python\nimport torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
                "\nmodel = AutoModelForSequenceClassification.from_pretrained(DIR).eval()\n"
                "tokenizer = AutoTokenizer.from_pretrained(DIR)\n"
                f"batch = tokenizer([\"your text\"], padding=True, truncation=True, max_length="
                f"{run.recipe.model.max_length}, return_tensors=\"pt\")\n"
                f"with torch.no_grad():\n    {use}\n```")
    if family == "seq2seq":
        return ("```python\nfrom transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
                "model = AutoModelForSeq2SeqLM.from_pretrained(DIR)\ntokenizer = AutoTokenizer.from_pretrained(DIR)\n"
                "answer = model.generate(**tokenizer([\"your text\"], return_tensors=\"pt\"), max_new_tokens=64)\n"
                "print(tokenizer.decode(answer[0], skip_special_tokens=True))\n```")
    if getattr(tokenizer, "chat_template", None) and run.metrics.get("chat_template", True):
        prompt = ("prompt = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"your text\"}],\n"
                  "                                       add_generation_prompt=True, tokenize=False)\n"
                  "inputs = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens=False)\n")
    else:
        prompt = "inputs = tokenizer(\"your text\", return_tensors=\"pt\")\n"
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(DIR)\ntokenizer = AutoTokenizer.from_pretrained(DIR)\n"
            f"{prompt}output = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
            "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n```")
