"""Try a finished run: label texts with a classifier, or stream a generative run's answer beside its base model's
(the recipe's model.name, resolved as training resolved it), so the difference training made shows live.

Loaded models are kept (a few at a time) so that the second question does not load them again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.recipe import GenerateConfig
from tunelab.runs.folder import RunFolder
from tunelab.tasks import refusal

KEPT_MODELS = 4


class Playground:
    """Loads runs' models on first use and answers with them."""

    def __init__(self) -> None:
        self._models: OrderedDict[tuple[Path, str], object] = OrderedDict()
        self._lock = threading.Lock()

    def _load(self, key: tuple[Path, str], load) -> object:
        with self._lock:  # one load at a time: two copies of one model would only cost memory
            if key not in self._models:
                try:
                    self._models[key] = load()
                except TunelabError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a run folder is untrusted input: a missing or corrupt
                    # model file is the run's problem, answered as an error, not a crash of the board
                    raise TunelabError(f"run '{key[0].name}': its model cannot be loaded ({type(exc).__name__}: "
                                       f"{exc})") from None
                while len(self._models) > KEPT_MODELS:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def predict(self, run_dir: Path, text: str, top_k: int = 5) -> dict:
        """Labels with probabilities, most likely first."""
        task = RunFolder(run_dir).task
        if not task.labels:
            raise TunelabError(refusal(f"run '{run_dir.name}'", task.name, "labels", "labelling texts"))
        from tunelab.inference.trained import load_trained

        trained = self._load((run_dir, "classifier"), lambda: load_trained(run_dir))
        try:
            row = trained.probabilities([text])[0]
        except Exception as exc:  # noqa: BLE001 - the tokenizer and model are the run's; their failure is its error
            raise TunelabError(f"run '{run_dir.name}' could not label the text ({type(exc).__name__}: {exc})") from None
        order = row.argsort()[::-1][:top_k]
        return {"text": text, "labels": [{"label": trained.labels[i], "probability": round(float(row[i]), 6)}
                                         for i in order]}

    def stream(self, run_dir: Path, which: str, text: str, settings: GenerateConfig) -> Iterator[str]:
        """The tuned run's (or its base model's) answer to `text`, piece by piece."""
        run = RunFolder(run_dir)
        task = run.task
        if not task.answers:
            raise TunelabError(refusal(f"run '{run_dir.name}'", task.name, "answers", "chatting"))
        from tunelab.inference.generator import load_generator

        tuned = self._load((run_dir, "tuned"), lambda: load_generator(run_dir))
        if which == "base":
            if not task.base_answers:  # e.g. a seq2seq base warm-started from an encoder
                raise TunelabError(f"the base of a {task.name} run cannot answer on its own")
            generator = self._load((run_dir, "base"), lambda: base_generator(tuned, run.recipe.model.name))
        elif which == "tuned":
            generator = tuned
        else:
            raise TunelabError(f"model must be 'tuned' or 'base', not {which!r}")
        return stream_answer(generator, text, settings)


def base_generator(tuned, model_name: str):
    """The run's starting model with the run's own prompt format, so both see the very same prompt."""
    from tunelab.data.sft_encoding import PromptFormat
    from tunelab.inference.generator import Generator
    from tunelab.models.loading import load_causal_lm, load_tokenizer, resolve_model

    location = resolve_model(model_name).location
    tokenizer = load_tokenizer(location)
    prompt = PromptFormat(tokenizer, tuned.prompt.chat_template) if tuned.prompt is not None else None
    return Generator(model=load_causal_lm(location).eval(), tokenizer=tokenizer, task=tuned.task, data=tuned.data,
                     data_format=tuned.data_format, prompt=prompt)


def stream_answer(generator, text: str, settings: GenerateConfig) -> Iterator[str]:
    """Through the chat template (`stream_chat`, with the text put into the prompt shape training used), or, for a
    model trained on plain text, the rendered prompt continued token by token."""
    from tunelab.data.generative import prompt_row

    if generator.prompt is not None and generator.prompt.uses_chat_template:  # trained through a chat template
        messages = prompt_row(generator.data, generator.data_format, text)["messages"][:-1]
        yield from generator.stream_chat(messages, settings)
        return
    yield from stream_plain(generator, generator.render(text), settings)


def stream_plain(generator, prompt: str, settings: GenerateConfig) -> Iterator[str]:
    """The rendered prompt continued, piece by piece (with the tokenizer's own start token)."""
    from tunelab.inference.generator import stream_generate

    yield from stream_generate(generator.model, generator.tokenizer, generator.tokenizer(prompt)["input_ids"], settings)
