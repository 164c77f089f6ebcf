"""The engines behind `tunelab serve`: load what MODEL names and answer requests; no HTTP here.

A text generator gets a `GenerationEngine`: tunelab's generation engine (tunelab/generation) with continuous
batching. A request's choices join the running batch at the next decoding step, each with its own settings —
max_tokens, temperature, top_p, top_k, seed and stop sequences — and stream their text to the request as it
becomes final. A row whose sampling or decoding raises ends alone with an error event; the others go on, so one
request cannot fail the requests it happened to be batched with, and one long answer no longer holds up short ones.

An encoder or an embed run gets an `EmbeddingEngine` (sentence-transformers: its pooling, normalised), a classifier
run a `ClassifierEngine` that answers with `tunelab predict`'s numbers.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from tunelab.errors import TunelabError, one_line
from tunelab.generation.decoder import Row
from tunelab.generation.engine import Batcher, decode_all, decoder_for, new_row
from tunelab.generation.sampling import Sampling
from tunelab.generation.weights import use_format
from tunelab.runs.folder import RunFolder
from tunelab.serve.protocol import APIError

MAX_WAITING = 512  # choices queued beyond this are refused (429) rather than piling up


@dataclass(eq=False)
class Choice(Row):
    """One answer of a request: a row of the generation engine whose events go to the request's coroutine.

    Events are ("text", delta) pieces, then ("done", finish_reason) or ("error", message).
    """

    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def send(self, *event) -> None:
        """Hand an event to the request's coroutine (called from the decoding thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def on_text(self, piece: str) -> None:
        self.send("text", piece)

    def on_done(self, reason: str) -> None:
        self.send("done", reason)

    def on_error(self, message: str) -> None:
        self.send("error", message)


class GenerationEngine:
    """A text generator answering chat and completion requests, continuously batched by a decoding thread."""

    kind = "generate"

    def __init__(self, model: torch.nn.Module, tokenizer, chat_template: str | None, max_batch: int,
                 encoder_decoder: bool = False) -> None:
        self.model, self.tokenizer, self.chat_template = model.eval(), tokenizer, chat_template
        # an encoder-decoder reads the prompt in its encoder and writes the answer from scratch: no context check
        # applies to the two together
        self.context = None if encoder_decoder else context_length(model.config)
        self.batcher = Batcher(decoder_for(self.model, tokenizer), max_batch)
        self.weights = "float32"  # the format the linear layers run in, as /health shows it

    def use_weights(self, name: str) -> None:
        """Decode with the weights in format `name` (generation/weights.py): bfloat16 or int8 read fewer bytes per
        token, but a greedy answer may then differ from fp32's and shift with the batch it ran in."""
        use_format(self.model, name)
        self.weights = name

    def compile_steps(self) -> None:
        """Decode an answer that runs alone through compiled steps (generation/compiled.py), compiled now for the
        shortest cache length so that the first request does not wait for it."""
        decoder = self.batcher.decoder
        if not decoder.compile_solo_steps():
            raise TunelabError("--compile needs a decoder whose attention sees the whole context (this model has "
                               "sliding windows, is an encoder-decoder or a prompt-learning adapter); serve it "
                               "without --compile")
        print("tunelab: compiling the decode step (once per answer length bucket, up to a minute each)…",
              file=sys.stderr, flush=True)
        try:
            decode_all(decoder, [[decoder.pad]], Sampling(max_tokens=2, ignore_eos=True), 1)
        except Exception as exc:  # noqa: BLE001 - inductor raises many kinds; each means this model cannot compile
            raise TunelabError(f"--compile failed for this model ({one_line(exc, 200)}); serve it without "
                               f"--compile") from None

    # -- requests -------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the chat template, ending with the assistant's header."""
        if self.chat_template is None:
            raise APIError(400, "this model has no chat template, so it cannot take chat messages; use "
                                "/v1/completions with a prompt", "messages", "no_chat_template")
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises several types; each means the template refuses these messages
            raise APIError(400, f"the model's chat template refuses these messages: {one_line(exc, 200)}",
                           "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of a plain prompt (with the tokenizer's own start token, as `tunelab generate` encodes it)."""
        return self.tokenizer(text)["input_ids"]

    def submit(self, prompt: list[int], *, max_tokens: int, temperature: float, top_p: float, stops: list[str],
               seed: int | None, n: int, ignore_eos: bool = False, top_k: int = -1) -> list[Choice]:
        """Queue `n` choices for one prompt; their events arrive on each choice's queue."""
        if self.context is not None and len(prompt) + max_tokens > self.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}: together over "
                                f"the model's context of {self.context} tokens; shorten the prompt or lower "
                                f"max_tokens", "max_tokens", "context_length_exceeded")
        waiting = self.batcher.waiting.qsize()
        if waiting + n > MAX_WAITING:
            raise APIError(429, f"the server has {waiting} answers waiting; retry shortly", None, "overloaded")
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stops=tuple(stops), ignore_eos=ignore_eos)
        loop = asyncio.get_running_loop()
        choices = [new_row(self.batcher.decoder, prompt, sampling, offset=i, kind=Choice, loop=loop)
                   for i in range(n)]
        self.batcher.submit(choices)
        return choices

    # -- the decoding thread --------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        """Shut down: running answers end at the next step, and the thread exits."""
        self.batcher.stop()

    def stats(self) -> dict:
        stats = self.batcher.stats()
        # "batches": prefills (each admits the choices that arrived since the last step), "batched_requests": the
        # choices they admitted
        return {**stats, "batches": stats["prefills"], "batched_requests": stats["admitted"], "weights": self.weights}


class InlineEngine:
    """An engine that answers each request in the request's own thread, one at a time (under `lock`): no worker to
    start or stop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


class ScoreEngine(InlineEngine):
    """A reward-model run scoring texts (or prompt + response) the way the run scored them (/v1/score)."""

    kind = "score"

    def __init__(self, run: Path) -> None:
        from tunelab.evaluation.judge import load_reward
        from tunelab.models.loading import load_tokenizer
        from tunelab.recipe import RewardSource

        super().__init__()
        self.reward = load_reward(RewardSource(model=str(run)), batch_size=16, bf16=False)
        self.tokenizer = load_tokenizer(str(run / "model"))

    def score(self, prompts: list[str], responses: list[str]) -> tuple[list[float], int]:
        """One scalar per (prompt, response), higher = preferred, and the tokens read (of the texts the reward
        model reads: prompt and response joined as it joins them)."""
        from tunelab.evaluation.judge import reward_texts  # loaded already, by load_reward

        with self.lock:
            scores = self.reward(prompts=prompts, completions=responses)  # as `tunelab predict` and the run score
        tokens = sum(map(len, self.tokenizer(reward_texts(prompts, responses))["input_ids"]))
        return [float(value) for value in scores], tokens


class EmbeddingEngine(InlineEngine):
    """A sentence encoder: mean-pooled, L2-normalised vectors, exactly as sentence-transformers computes them."""

    kind = "embed"

    def __init__(self, location: str) -> None:
        from sentence_transformers import SentenceTransformer

        from tunelab.models.sentence_encoder import quiet_setfit

        super().__init__()
        quiet_setfit()
        self.model = SentenceTransformer(location, device="cpu")

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors for the texts and the number of tokens read."""
        with self.lock:
            vectors = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False)
            tokens = self.model.tokenizer(texts, truncation=True, max_length=self.model.max_seq_length)["input_ids"]
        return vectors, sum(map(len, tokens))

    def stats(self) -> dict:
        return {}


class ClassifierEngine(InlineEngine):
    """A trained classifier (classify or fewshot run, or a sequence-classification folder)."""

    kind = "classify"

    def __init__(self, trained) -> None:
        from tunelab.api import label_texts  # imported at start-up: tunelab.api pulls in every stage (seconds)

        super().__init__()
        self.trained, self.label_texts = trained, label_texts

    def classify(self, texts: list[str], top_k: int) -> tuple[list[dict], int]:
        """`tunelab predict`'s rows for the texts (the same code) and the number of tokens read."""
        with self.lock:
            rows = self.label_texts(self.trained, texts, min(top_k, len(self.trained.labels)))
        tokenizer = getattr(self.trained, "tokenizer", None) or getattr(
            getattr(self.trained.model, "model_body", None), "tokenizer", None)
        tokens = sum(map(len, tokenizer(texts, truncation=True)["input_ids"])) if tokenizer is not None else 0
        return rows, tokens

    def stats(self) -> dict:
        return {"labels": len(self.trained.labels)}


def context_length(config) -> int | None:
    from tunelab.models.loading import context_length as longest

    return longest(config)


def load_engine(name: str, max_batch: int) -> GenerationEngine | EmbeddingEngine | ClassifierEngine | ScoreEngine:
    """What MODEL names, loaded: a run folder, a plain Hugging Face folder (e.g. an export), a .gguf file or an
    alias."""
    from tunelab.models.aliases import OFFLINE_MODELS
    from tunelab.models.loading import resolve_model
    from tunelab.runs.folder import finished_run, run_folder

    path = Path(name).expanduser()
    if name in OFFLINE_MODELS:
        location = resolve_model(name).location
        if OFFLINE_MODELS[name].family == "encoder":
            return EmbeddingEngine(location)
        return decoder_engine(location, max_batch)
    if path.is_file() and path.suffix == ".gguf":
        return decoder_engine(resolve_model(name).location, max_batch)
    if path.is_dir() and run_folder(path) is not None:
        return run_engine(finished_run(path, "tunelab serve"), max_batch)
    if path.is_dir() and (path / "config.json").is_file():
        return folder_engine(path, max_batch)
    raise TunelabError(f"MODEL '{name}' is not a run folder (recipe.yaml + model/), a model folder with config.json, "
                       f"a .gguf file or an alias ({', '.join(OFFLINE_MODELS)})")


def run_engine(run: RunFolder, max_batch: int):
    """A finished run folder, served as its task says (the registry): answering runs generate, labelling runs
    classify, reward runs score, embedding runs embed."""
    from tunelab.inference.generator import load_generator
    from tunelab.inference.trained import load_trained
    from tunelab.tasks import refusal

    task = run.task
    if task.answers:
        generator = load_generator(run.path)
        return GenerationEngine(generator.model, generator.tokenizer, generator.chat_template, max_batch,
                                encoder_decoder=generator.prompt is None)
    if task.labels:
        return ClassifierEngine(load_trained(run.path))
    if task.scores:
        return ScoreEngine(run.path)
    if task.embeds:
        return EmbeddingEngine(str(run.model_dir))
    raise TunelabError(refusal(f"'{run.path}'", task.name, ("answers", "labels", "scores", "embeds"), "tunelab serve"))


def folder_engine(path: Path, max_batch: int):
    """A plain Hugging Face folder: its architecture says causal LM, sequence classifier or encoder."""
    from tunelab.inference.trained import load_trained_classifier

    architectures = AutoConfig.from_pretrained(path).architectures or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return decoder_engine(str(path), max_batch)
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return ClassifierEngine(load_trained_classifier(path))
    return EmbeddingEngine(str(path))


def decoder_engine(location: str, max_batch: int) -> GenerationEngine:
    from tunelab.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(location)
    return GenerationEngine(load_causal_lm(location), tokenizer, getattr(tokenizer, "chat_template", None),
                            max_batch)
