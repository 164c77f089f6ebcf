"""What each task is, in one place: its model family, its stage, and what its finished runs can do.

Commands ask this registry instead of testing task names: `generate`, `chat`, `serve` and the playground take the
runs whose task `answers`; `predict` and `/v1/classify` those that `labels`; `predict` and `/v1/score` those that
`scores`; `/v1/embeddings` those that `embeds`; `export` the formats in `exports`. A task whose data or exports the
built-in loaders and writers do not cover names its own (`loader`, `exporter`), as it names its stage. A command a
task does not support is refused with `refusal`, which names the commands that do take it.

This module imports nothing of tunelab's, so that the recipe schema, the loaders and the servers can all read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Family = Literal["classifier", "fewshot", "decoder", "seq2seq", "reward", "embedder"]


@dataclass(frozen=True)
class Task:
    """One task: how it trains and what its finished runs support."""

    name: str
    family: Family  # classifier: encoder (or decoder) with a label head; decoder: causal LM; reward: one score;
    # embedder: a sentence encoder (sentence-transformers) whose output is the embedding
    summary: str  # what a run of it learns, in a few words
    runner: str  # "module:function" of its stage (imported only when a run starts)
    answers: bool = False  # generate, chat, serve's chat/completions, the playground's answers
    prompts: Literal["template", "plain", "encoder", None] = None  # how an answering run reads a prompt: through
    # data.prompt_template and the chat template (template), as the plain text it trained on (plain; chat turns go
    # through the model's own chat template), or in its encoder (encoder)
    labels: bool = False  # predict (labels), eval, serve's /v1/classify, the playground's labels
    scores: bool = False  # predict (scores), serve's /v1/score
    exports: tuple[str, ...] = ()  # export formats
    verify: bool = False  # export --verify scores its task metric through the export
    streaming: bool = False  # data.streaming
    judged: bool = False  # eval.judge compares its answers before and after
    replay: bool = False  # data.replay
    base_answers: bool = False  # its starting model can answer on its own (the playground's side-by-side)
    embeds: bool = False  # serve's /v1/embeddings (its model/ is a sentence-transformers folder)
    loader: str | None = None  # "module:function" reading its data from the recipe (None: tunelab.api's loaders)
    exporter: str | None = None  # "module:function" writing an export of its runs: (run, folder, format)

    def stage(self) -> Callable:
        """The stage's run function: run(recipe, data, source, run_dir, resume) → metrics."""
        return imported(self.runner)

    def load_data(self) -> Callable:
        """The task's own data loader: load(recipe) → the data its stage takes."""
        return imported(self.loader)

    def export(self) -> Callable:
        """The task's own export writer: write(run, folder, format), the format one of `exports`."""
        return imported(self.exporter)

    @property
    def decoder(self) -> bool:
        """Trains a causal LM on text (general-ability probes apply)."""
        return self.family == "decoder"

    @property
    def sentence_encoder(self) -> bool:
        """Tunes a sentence encoder (sentence-transformers): its model cannot be a decoder."""
        return self.family in ("fewshot", "embedder")


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("classify", "classifier", "labels texts", "tunelab.stages.classify:run_classification",
         labels=True, exports=("hf", "onnx"), verify=True),
    Task("fewshot", "fewshot", "labels texts from a few examples (SetFit)", "tunelab.stages.fewshot:run_fewshot",
         labels=True),
    Task("sft", "decoder", "answers prompts", "tunelab.stages.sft:run_sft",
         answers=True, prompts="template", exports=("hf", "gguf"), verify=True, streaming=True, replay=True,
         base_answers=True),
    Task("pretrain", "decoder", "continues text of a domain", "tunelab.stages.sft:run_sft",
         answers=True, prompts="plain", exports=("hf", "gguf"), streaming=True, replay=True, base_answers=True),
    Task("seq2seq", "seq2seq", "rewrites an input text into an output text", "tunelab.stages.seq2seq:run_seq2seq",
         answers=True, prompts="encoder", exports=("hf",)),
    Task("reward", "reward", "scores a response (reward model)", "tunelab.stages.reward:run_reward",
         scores=True, exports=("hf", "onnx")),
    Task("dpo", "decoder", "answers prompts as preferred (DPO family)", "tunelab.stages.dpo:run_dpo",
         answers=True, prompts="plain", exports=("hf", "gguf"), judged=True, replay=True, base_answers=True),
    Task("kto", "decoder", "answers prompts as preferred (KTO)", "tunelab.stages.kto:run_kto",
         answers=True, prompts="plain", exports=("hf", "gguf"), judged=True, replay=True, base_answers=True),
    Task("grpo", "decoder", "answers prompts for a higher reward (GRPO)", "tunelab.stages.grpo:run_grpo",
         answers=True, prompts="template", exports=("hf", "gguf"), judged=True, base_answers=True),
    Task("embed", "embedder", "embeds texts so that each query finds its paired text (retrieval, similarity)",
         "tunelab.stages.embed:run_embed", embeds=True, exports=("hf", "onnx"),
         loader="tunelab.stages.embed:load_embed_data", exporter="tunelab.stages.embed:write_embed_export"),
)}

TASK_NAMES = tuple(TASKS)


def imported(target: str | None) -> Callable:
    """The function a "module:function" string names, imported now (stages load torch: only when needed)."""
    module, function = str(target).split(":")
    return getattr(importlib.import_module(module), function)


def task_named(name: object) -> Task | None:
    """The task called `name`, or None (an unknown or missing task in a run folder written elsewhere)."""
    return TASKS.get(name) if isinstance(name, str) else None


def tasks_that(*capabilities: str) -> tuple[str, ...]:
    """The names of the tasks with any of `capabilities` (Task fields or properties) set."""
    return tuple(name for name, task in TASKS.items() if any(getattr(task, c) for c in capabilities))


# What each capability is for, as the commands that use it (for refusals: "use … instead").
USES = {"answers": "`tunelab generate` / `tunelab chat`", "labels": "`tunelab predict` (labels)",
        "scores": "`tunelab predict` (scores)", "embeds": "`tunelab serve` (/v1/embeddings)"}


def refusal(what: str, task: object, needs: str | tuple[str, ...], action: str) -> str:
    """One line refusing `action` for a run (`what`, e.g. "'runs/x'") of `task`, which lacks `needs` (a capability,
    or any of several): it names the tasks that have it and what this run works with instead."""
    known = task_named(task)
    instead = [use for capability, use in USES.items() if known is not None and getattr(known, capability)]
    hint = f"; this run works with {' and '.join(instead)}" if instead else ""
    needed = (needs,) if isinstance(needs, str) else needs
    return f"{what} is a {task} run; {action} takes runs of tasks {', '.join(tasks_that(*needed))}{hint}"
