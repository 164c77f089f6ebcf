"""The engines behind `tunelab serve`: load what MODEL names and answer requests; no HTTP here.

A decoder gets a `GenerationEngine`, which batches concurrent requests: a worker thread takes the requests that
are waiting (up to --max-batch, after waiting a few milliseconds for more to arrive), left-pads them into one batch
and runs `model.generate` once for all of them. Each row keeps its own settings — max_tokens, temperature, top_p,
top_k, seed and stop sequences — through a logits processor (samples a row's token with the row's own seeded
generator) and a stopping criterion that returns one bool per row and streams each row's new text to its request.
A row whose sampling or decoding raises ends alone with an error event; the other rows of its batch go on, so one
request cannot fail the requests it happened to be batched with.

Why not transformers' continuous batching (`init_continuous_batching`)? It runs on CPU here and is fast (SmolLM2,
8 requests: 4.4x the tokens/s of one at a time, greedy answers equal), but greedy vs sampling, `n` and the default
temperature are fixed per manager, there is no per-request seed, and results come back through one shared queue
that requests re-queue for each other. A request's own sampling settings are part of the OpenAI protocol, so the
batching loop here is small and tunelab's own; new requests join at the next batch rather than the next step.

An encoder or an embed run gets an `EmbeddingEngine` (sentence-transformers: its pooling, normalised), a classifier
run a `ClassifierEngine` that answers with `tunelab predict`'s numbers.
"""

from __future__ import annotations

import asyncio
import queue
import random
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from tunelab.errors import TunelabError, one_line
from tunelab.runs.folder import RunFolder
from tunelab.serve.protocol import APIError

# Sampling divides logits by the temperature: a tiny one (1e-300 passes validation) turned them into inf and the
# softmax into NaN. With the row's maximum subtracted first and the temperature floored here, the likeliest token
# gets probability ~1 instead: a tiny temperature samples as greedy does.
MIN_TEMPERATURE = 1e-6
BATCH_WAIT_S = 0.02  # a batch waits this long after each arrival for one more request ...
MAX_BATCH_WAIT_S = 0.15  # ... and no longer than this in all
MAX_WAITING = 512  # choices queued beyond this are refused (429) rather than piling up


@dataclass(eq=False)
class Choice:
    """One answer being generated: its settings, the tokens so far, and the queue its request reads events from.

    Events are ("text", delta) pieces, then ("done", finish_reason) or ("error", message).
    """

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stops: list[str]
    ignore_eos: bool
    generator: torch.Generator | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finished: bool = False
    cancelled: bool = False

    def send(self, *event) -> None:
        """Hand an event to the request's coroutine (called from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def finish(self, reason: str, text: str | None = None) -> None:
        """Send the text not sent yet (if any) and the finish reason."""
        if text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.send("text", text[len(self.sent):])
            self.sent = text
        self.finished = True
        self.send("done", reason)

    def fail(self, exc: Exception) -> None:
        """End this choice alone with an error event (the traceback goes to the server's log)."""
        traceback.print_exc(file=sys.stderr)
        self.finished = True
        self.send("error", f"generation failed: {one_line(exc, 200)}")

    def cancel(self) -> None:
        """The client went away: the worker stops generating for this choice at its next step."""
        self.cancelled = True


class RowSampler(LogitsProcessor):
    """Per-row sampling inside a greedy `generate`: a sampling row's token is drawn here (temperature, top_k, top_p,
    the row's seeded generator) and its scores become one-hot, so the greedy argmax picks it; greedy rows pass as is
    (an ignore_eos row with its end-of-sequence tokens masked). A row that raises here fails alone."""

    def __init__(self, rows: list[Choice], eos_ids: set[int]) -> None:
        self.rows, self.eos_ids = rows, sorted(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            if row.finished:
                continue
            try:
                if row.ignore_eos:
                    scores[i, self.eos_ids] = float("-inf")
                if row.temperature > 0:
                    token = self.sample(row, scores[i])
                    scores[i] = float("-inf")
                    scores[i, token] = 0
            except Exception as exc:  # any failure of one row ends that row, not the batch
                row.fail(exc)
        return scores

    @staticmethod
    def sample(row: Choice, scores: torch.FloatTensor) -> int:
        """The row's next token, drawn from its scores with its own settings and generator."""
        logits = scores.float()
        logits = (logits - logits.max()) / max(row.temperature, MIN_TEMPERATURE)  # see MIN_TEMPERATURE
        if 0 < row.top_k < len(logits):
            logits[logits < logits.topk(row.top_k).values[-1]] = float("-inf")
        probabilities = torch.softmax(logits, dim=-1)
        if row.top_p < 1:
            ordered, order = probabilities.sort(descending=True)
            outside = ordered.cumsum(-1) - ordered > row.top_p  # keep the smallest set reaching top_p
            probabilities[order[outside]] = 0
        return int(torch.multinomial(probabilities, 1, generator=row.generator))


class RowStopper(StoppingCriteria):
    """Called after every step: records each row's new token, streams its new text, and says which rows are done
    (end of sequence, a stop sequence, its own max_tokens, or a cancelled request)."""

    def __init__(self, rows: list[Choice], tokenizer, eos_ids: set[int]) -> None:
        self.rows, self.tokenizer, self.eos_ids = rows, tokenizer, eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(self.rows):
            if not row.finished:
                try:
                    self.advance(row, int(input_ids[i, -1]))
                except Exception as exc:  # a row that cannot be decoded ends alone, not the batch
                    row.fail(exc)
            done[i] = row.finished or row.cancelled
        return done

    def advance(self, row: Choice, token: int) -> None:
        if row.cancelled:
            row.finished = True
            return
        if token in self.eos_ids:
            row.finish("stop", self.decode(row))
            return
        row.tokens.append(token)
        text = self.decode(row)
        hits = [text.find(stop) for stop in row.stops if stop in text]
        if hits:
            row.finish("stop", text[:min(hits)])
        elif len(row.tokens) >= row.max_tokens:
            row.finish("length", text)
        else:
            # hold back a partial character, and any tail that may be the start of a stop sequence
            hold = max((len(stop) - 1 for stop in row.stops), default=0)
            ready = text.rstrip("\ufffd")
            ready = ready[:len(ready) - hold] if hold else ready
            if ready.startswith(row.sent) and len(ready) > len(row.sent):
                row.send("text", ready[len(row.sent):])
                row.sent = ready

    def decode(self, row: Choice) -> str:
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True)


class GenerationEngine:
    """A decoder answering chat and completion requests, batched by a worker thread."""

    kind = "generate"

    def __init__(self, model: torch.nn.Module, tokenizer, chat_template: str | None, max_batch: int,
                 encoder_decoder: bool = False) -> None:
        self.model, self.tokenizer, self.chat_template = model.eval(), tokenizer, chat_template
        self.max_batch = max_batch
        # an encoder-decoder reads the prompt in its encoder and writes the answer from scratch: no context check
        # applies to the two together (generate, the left-padded batch and the stop checks work as for decoders)
        self.context = None if encoder_decoder else context_length(model.config)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None
                                                      else [])
        self.eos_ids.discard(None)
        self.waiting: queue.Queue[Choice] = queue.Queue()
        self.running: list[Choice] = []
        self.batches = 0  # generate calls so far, and the rows they held: the batching, as /health shows it
        self.batched_rows = 0
        self.last_batch_size = 1
        self.stopping = threading.Event()
        self.worker: threading.Thread | None = None

    def use_bfloat16(self) -> None:
        """Keep the weights in bf16: batched decoding costs about what one row does on CPUs with bf16 matmuls, but
        rounding then depends on the batch's shape, so a greedy answer may change with the batch it ran in."""
        self.model.to(torch.bfloat16)

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
        if self.waiting.qsize() + n > MAX_WAITING:
            raise APIError(429, f"the server has {self.waiting.qsize()} answers waiting; retry shortly",
                           None, "overloaded")
        loop = asyncio.get_running_loop()
        choices = []
        for i in range(n):
            generator = None
            if temperature > 0:
                generator = torch.Generator().manual_seed(seed + i if seed is not None else random.getrandbits(63))
            choices.append(Choice(prompt, max_tokens, temperature, top_p, top_k, stops, ignore_eos, generator, loop))
        for choice in choices:
            self.waiting.put(choice)
        return choices

    # -- the worker -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.worker = threading.Thread(target=self.work, name="tunelab-batcher", daemon=True)
        self.worker.start()

    def stop(self) -> None:
        """Shut down: the running batch ends at its next step, and the worker exits."""
        self.stopping.set()
        for choice in list(self.running):
            choice.cancel()
        if self.worker is not None:
            self.worker.join(timeout=30)

    def work(self) -> None:
        while not self.stopping.is_set():
            batch = self.next_batch()
            if batch:
                self.run(batch)

    def next_batch(self) -> list[Choice]:
        """The first waiting choice, plus those arriving while the batch gathers, up to max_batch; cancelled ones
        are dropped here without running.

        Clients whose answers came back together send their next requests tens of milliseconds apart on a busy
        machine (HTTP, template, tokenizer), so a fixed short window split them into uneven batches. The batch
        therefore waits (at most MAX_BATCH_WAIT_S) until it is as large as the last one, then as long as arrivals
        keep coming less than BATCH_WAIT_S apart. A lone client only ever waits BATCH_WAIT_S."""
        try:
            batch = [self.waiting.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + MAX_BATCH_WAIT_S
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            wait = left if len(batch) < self.last_batch_size else min(BATCH_WAIT_S, left)
            try:
                batch.append(self.waiting.get(timeout=wait) if wait > 0 else self.waiting.get_nowait())
            except queue.Empty:
                break
        self.last_batch_size = len(batch)
        return [choice for choice in batch if not choice.cancelled]

    def run(self, batch: list[Choice]) -> None:
        """One `generate` call for the batch; every choice ends with a done or error event."""
        self.running = batch
        self.batches, self.batched_rows = self.batches + 1, self.batched_rows + len(batch)
        width = max(len(choice.prompt) for choice in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(c.prompt)) + c.prompt for c in batch])
        attention_mask = torch.tensor([[0] * (width - len(c.prompt)) + [1] * len(c.prompt) for c in batch])
        settings = GenerationConfig(max_new_tokens=max(c.max_tokens for c in batch), do_sample=False,
                                    pad_token_id=pad, eos_token_id=sorted(self.eos_ids) or None)
        special = any(c.temperature > 0 or c.ignore_eos for c in batch)
        processors = LogitsProcessorList([RowSampler(batch, self.eos_ids)] if special else [])
        try:
            with torch.inference_mode():
                self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=settings,
                                    logits_processor=processors, stopping_criteria=StoppingCriteriaList(
                                        [RowStopper(batch, self.tokenizer, self.eos_ids)]))
        except Exception as exc:  # a failed batch must not kill the worker: its requests get the error instead
            traceback.print_exc(file=sys.stderr)
            for choice in batch:
                if not choice.finished:
                    choice.finished = True
                    choice.send("error", f"generation failed: {one_line(exc, 200)}")
        finally:
            for choice in batch:
                if not choice.finished:  # generate stopped on its own length limit first
                    choice.finish("length")
            self.running = []

    def stats(self) -> dict:
        return {"waiting": self.waiting.qsize(), "running": sum(not c.finished for c in self.running),
                "batches": self.batches, "batched_requests": self.batched_rows}


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
