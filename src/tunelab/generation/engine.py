"""Driving a `Decoder`: a server's decoding thread (rows arrive in a queue and join at the next step), and answering
a list of prompts at once (the before/after scoring, `tunelab generate`), a finished row's place taken by the
next prompt at the next step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tunelab.errors import TunelabError
from tunelab.generation.decoder import Decoder, Row, failure
from tunelab.generation.sampling import Sampling, new_generator
from tunelab.generation.text import AnswerText


def new_row(decoder: Decoder, prompt: list[int], sampling: Sampling, offset: int = 0, kind: type[Row] = Row,
            **extra) -> Row:
    """A row for `prompt` with its own text decoder and random stream (`seed + offset` for the n-th choice)."""
    return kind(prompt=prompt, sampling=sampling, text=AnswerText(decoder.tokenizer, sampling.stops),
                generator=new_generator(sampling, offset), **extra)


def decode_all(decoder: Decoder, prompts: list[list[int]], sampling: Sampling | list[Sampling], batch_size: int,
               progress: Callable[[int], None] | None = None) -> list[Row]:
    """Decode every prompt (one sampling for all, or one each), at most `batch_size` rows at once, a finished row's
    place taken by the next prompt at the next step; `progress(n)` hears of every n rows finished."""
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    rows = [new_row(decoder, prompt, each) for prompt, each in zip(prompts, samplings, strict=True)]
    pending = list(reversed(rows))
    done = 0
    while pending or decoder.rows:
        room = batch_size - len(decoder.rows)
        if room > 0 and pending and decoder.can_join():
            decoder.admit([pending.pop() for _ in range(min(room, len(pending)))])
        if decoder.rows:
            decoder.step()
        finished = sum(row.finished for row in rows)
        if progress is not None and finished > done:
            progress(finished - done)
        done = finished
    failed = next((row.error for row in rows if row.error), None)
    if failed:
        raise RuntimeError(failed)
    return rows


def answer_all(decoder: Decoder, prompts: list[list[int]], sampling: Sampling, batch_size: int,
               progress: Callable[[int], None] | None = None) -> list[str]:
    """Each prompt's answer (its new text, stripped): `decode_all`'s rows as text."""
    return [row.text.text.strip() for row in decode_all(decoder, prompts, sampling, batch_size, progress)]


@dataclass(eq=False)
class Streamed(Row):
    """A row whose pieces of text are collected for its reader."""

    pieces: list[str] = field(default_factory=list)

    def on_text(self, piece: str) -> None:
        self.pieces.append(piece)


def stream_one(decoder: Decoder, prompt: list[int], sampling: Sampling) -> Iterator[str]:
    """One answer's pieces as they are decoded (`tunelab chat`, the playground); the decoder is the caller's own.
    Each step runs inside the reader's `next`, so the reader may move between threads."""
    row = new_row(decoder, prompt, sampling, kind=Streamed)
    try:
        decoder.admit([row])
        while True:
            yield from row.pieces
            row.pieces.clear()
            if row.finished or not decoder.rows:
                break
            decoder.step()
    except Exception as exc:  # noqa: BLE001 - the model's forward raised: the stream ends with the error
        raise TunelabError(failure(exc)) from None
    if row.error:
        raise TunelabError(row.error)


class Batcher:
    """A server's decoding thread: `submit` queues rows; each step first admits the rows that arrived (up to
    `max_batch` running), then decodes one token for all."""

    def __init__(self, decoder: Decoder, max_batch: int) -> None:
        self.decoder, self.max_batch = decoder, max_batch
        self.waiting: queue.Queue[Row] = queue.Queue()
        self.stopping = threading.Event()
        self.worker: threading.Thread | None = None
        # The thread that loaded the model runs `work` itself: torch's OpenMP threads then stay that thread's. A second
        # thread decoding with its own OpenMP team ran bf16 and int8 weights 2.4x slower on 2 cores (15 vs 37 tokens/s)
        self.here = False
        self.admitted = 0  # rows that joined so far, and in how many prefills: the batching, as /health shows it
        self.prefills = 0
        self.widest = 0

    def submit(self, rows: list[Row]) -> None:
        for row in rows:
            self.waiting.put(row)

    def start(self) -> None:
        """Decode in a thread of its own, unless the caller's thread runs `work` itself (`decode_here`)."""
        if not self.here:
            self.worker = threading.Thread(target=self.work, name="tunelab-decoder", daemon=True)
            self.worker.start()

    def stop(self) -> None:
        """Shut down: running rows end at the next step, and the thread exits."""
        self.stopping.set()
        self.decoder.cancel_all()
        if self.worker is not None:
            self.worker.join(timeout=30)

    def work(self) -> None:
        with torch.inference_mode():
            while not self.stopping.is_set():
                joining = self.arrivals()
                try:
                    if joining:
                        self.decoder.admit(joining)
                        self.admitted, self.prefills = self.admitted + len(joining), self.prefills + 1
                    if self.decoder.rows:
                        self.widest = max(self.widest, len(self.decoder.rows))
                        self.decoder.step()
                except Exception as exc:  # noqa: BLE001 - a failed forward ends its rows, not the server
                    for row in joining:
                        if not row.finished:
                            row.fail(exc)
                    self.decoder.fail_all(exc)

    def arrivals(self) -> list[Row]:
        """Rows that may join now: all that wait, up to the room left (blocking briefly when nothing runs)."""
        if not self.decoder.can_join():
            return []
        room = self.max_batch - len(self.decoder.rows)
        rows: list[Row] = []
        if room > 0 and not self.decoder.rows:
            try:
                rows.append(self.waiting.get(timeout=0.1))
            except queue.Empty:
                return []
        while len(rows) < room:
            try:
                rows.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return [row for row in rows if not row.cancelled]

    def stats(self) -> dict:
        return {"waiting": self.waiting.qsize(), "running": len(self.decoder.rows), "steps": self.decoder.steps,
                "admitted": self.admitted, "prefills": self.prefills, "widest_batch": self.widest}


def decoder_for(model: torch.nn.Module, tokenizer, bf16: bool = False) -> Decoder:
    """The decoder for a model: rows join a running batch for causal LMs, run whole batches for encoder-decoders
    and prompt-learning adapters. A row ends at the tokenizer's end-of-sequence token or any of the model's
    generation config."""
    from tunelab.generation.whole_batch import WholeBatchDecoder

    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.discard(None)
    peft = getattr(model, "active_peft_config", None)
    # prompt and prefix tuning put virtual tokens (or their cached states) before each row: peft's generate places them
    whole = getattr(model.config, "is_encoder_decoder", False) or bool(peft and peft.is_prompt_learning)
    return (WholeBatchDecoder if whole else Decoder)(model, tokenizer, ids, bf16)
