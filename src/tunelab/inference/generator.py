"""Load a run that answers prompts (sft, pretrain, seq2seq, dpo, kto, grpo: the registry's `answers` tasks) back for
`tunelab generate`, `tunelab chat`, `tunelab serve` and the playground.

Prompts are put into the shape the run trained on: sft and grpo runs through their prompt template and chat template;
pretrain, dpo and kto runs read their prompts as plain text (chat turns go through the model's own chat template);
seq2seq runs read the text in their encoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.data.generative import prompt_row
from tunelab.data.sft_encoding import PromptFormat, prompt_format
from tunelab.errors import TunelabError
from tunelab.evaluation.generation import generate_texts
from tunelab.generation.engine import decoder_for, stream_one
from tunelab.generation.sampling import Sampling
from tunelab.models.loading import load_causal_lm, load_tokenizer
from tunelab.models.precision import bf16_supported
from tunelab.recipe import DataConfig, GenerateConfig
from tunelab.runs.folder import run_folder
from tunelab.tasks import refusal


@dataclass
class Generator:
    """A trained generative model with the prompt format its run trained on."""

    model: torch.nn.Module
    tokenizer: object
    task: str
    data: DataConfig
    data_format: str
    prompt: PromptFormat | None  # None for seq2seq: the encoder reads the text as it is

    def render(self, text: str) -> str:
        """A user's text as the model saw prompts in training (template, instruction wrapper, chat template)."""
        if self.prompt is None:
            return text
        return self.prompt.prompt_text(prompt_row(self.data, self.data_format, text))

    def generate(self, texts: list[str], settings: GenerateConfig) -> list[str]:
        """One answer per text."""
        prompts = [self.render(text) for text in texts]
        chat = self.prompt is not None and self.prompt.uses_chat_template
        return generate_texts(self.model, self.tokenizer, prompts, settings, bf16_supported(),
                              add_special_tokens=not chat)

    @property
    def chat_template(self) -> str | None:
        """The template chat turns go through: the one the run trained with, else (a decoder trained on plain text,
        e.g. dpo on transcripts) the model's own; None when there is neither (or for seq2seq)."""
        if self.prompt is None:
            return None
        return self.prompt.chat_template or getattr(self.tokenizer, "chat_template", None)

    def stream_chat(self, messages: list[dict], settings: GenerateConfig) -> Iterator[str]:
        """Stream the assistant's next turn, piece by piece, for a conversation rendered by the chat template."""
        if self.chat_template is None:
            raise TunelabError("this run's model has no chat template, so `tunelab chat` cannot format turns; use "
                               "`tunelab generate`, or train with data.chat_template set")
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        yield from stream_generate(self.model, self.tokenizer, prompt, settings)


def stream_generate(model, tokenizer, prompt: list[int], settings: GenerateConfig) -> Iterator[str]:
    """The answer to `prompt` (token ids), piece by piece as tunelab's generation engine decodes it (bf16 matmuls
    where the machine runs them natively). A failed generation ends the stream with its error as a TunelabError."""
    sampling = Sampling(max_tokens=settings.max_new_tokens, temperature=settings.temperature)
    yield from stream_one(decoder_for(model, tokenizer, bf16_supported()), prompt, sampling)


def load_generator(run_dir: str | Path) -> Generator:
    """Load a finished run folder of a task that answers prompts."""
    from tunelab.models.loading import load_seq2seq

    run = run_folder(run_dir)
    if run is None:
        raise TunelabError(f"'{run_dir}' is not a finished run folder (no recipe.yaml and model/); train one with "
                           f"`tunelab train`")
    task = run.task
    if not task.answers:
        raise TunelabError(refusal(f"'{run_dir}'", task.name, "answers", "answering prompts"))
    data = run.recipe.data
    data_format = run.metrics.get("data_format", "prompt_completion")
    model_dir = str(run.model_dir)
    tokenizer = load_tokenizer(model_dir)
    if task.prompts == "encoder":
        model = load_seq2seq(model_dir, tokenizer)
        fmt = None
    else:
        model = load_causal_lm(model_dir)
        fmt = prompt_format(tokenizer, data.chat_template, data_format, model_dir) if task.prompts == "template" \
            else PromptFormat(tokenizer, None)
    return Generator(model=model.eval(), tokenizer=tokenizer, task=task.name, data=data, data_format=data_format,
                     prompt=fmt)
