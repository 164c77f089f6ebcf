"""What each task is, in one place: its model family, its stage, and what its finished runs can do.

Commands ask this registry instead of testing task names: `generate`, `chat`, `serve` and the playground take the
runs whose task `answers`; `predict` and `/v1/classify` those that `labels`; `predict` and `/v1/score` those that
`scores`; `/v1/embeddings` those that `embeds`; `export` the formats in `exports`. A command a task does not support
is refused with `refusal`, which names the commands that do take it.

This module imports nothing of tunelab's, so that the recipe schema, the loaders and the servers can all read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

Family = Literal["classifier", "fewshot", "decoder", "seq2seq", "reward", "embedder"]


@dataclass(frozen=True)
class Task:
    """One task: how it trains and what its finished runs support."""

    name: str
    family: Family  # classifier: encoder (or decoder) with a label head; decoder: causal LM; reward: one score;
    # embedder: a sentence encoder (sentence-transformers) whose output is the embedding
    summary: str  # what a run of it learns, in a few words
    module: str  # its stage module (imported only when used): load_data(recipe) → data; check_model(recipe, data,
    # import_code) → the model source, checked before a run folder exists; run(recipe, data, source, run_dir,
    # resume) → metrics
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
    one_process: bool = False  # trains in one process only (no --nproc / torchrun)
    fsdp: bool = False  # train.distributed.strategy fsdp (FSDP2 shards a decoder trained in full)
    fp32_only: bool = False  # trains in fp32 whatever train.precision says
    pipeline_tag: str = "text-generation"  # the Hugging Face Hub's pipeline tag of its exported model card
    embeds: bool = False  # serve's /v1/embeddings (its model/ is a sentence-transformers folder)
    searched_on: str = "accuracy"  # the validation score `tunelab tune` optimises unless --metric names another
    neftune: bool = False  # train.neftune_noise_alpha (noisy embeddings for instruction tuning)
    moved_base: bool = False  # method.init_lora_weights pissa/olora, which change the base weights: neither a task
    # head (peft's conversion to plain LoRA drops it) nor a reference model (TRL's is the base with its adapter off,
    # or a copy of the adapter, initialised again on the changed base) depends on them

    def stage(self) -> ModuleType:
        """The task's stage module: its `load_data`, `check_model` and `run`."""
        return importlib.import_module(self.module)

    @property
    def decoder(self) -> bool:
        """Trains a causal LM on text (general-ability probes apply)."""
        return self.family == "decoder"


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("classify", "classifier", "labels texts", "tunelab.stages.classify",
         labels=True, exports=("hf", "onnx"), verify=True, pipeline_tag="text-classification"),
    Task("fewshot", "fewshot", "labels texts from a few examples (SetFit)", "tunelab.stages.fewshot",
         labels=True, one_process=True, fp32_only=True),
    Task("sft", "decoder", "answers prompts", "tunelab.stages.sft",
         answers=True, prompts="template", exports=("hf", "gguf"), verify=True, streaming=True, replay=True,
         base_answers=True, fsdp=True, searched_on="loss", neftune=True, moved_base=True),
    Task("pretrain", "decoder", "continues text of a domain", "tunelab.stages.sft",
         answers=True, prompts="plain", exports=("hf", "gguf"), streaming=True, replay=True, base_answers=True,
         fsdp=True, searched_on="loss", moved_base=True),
    Task("seq2seq", "seq2seq", "rewrites an input text into an output text", "tunelab.stages.seq2seq",
         answers=True, prompts="encoder", exports=("hf",), pipeline_tag="text2text-generation",
         searched_on="loss", moved_base=True),
    Task("reward", "reward", "scores a response (reward model)", "tunelab.stages.reward",
         scores=True, exports=("hf", "onnx"), pipeline_tag="text-classification",
         searched_on="pairwise_accuracy"),
    Task("dpo", "decoder", "answers prompts as preferred (DPO family)", "tunelab.stages.dpo",
         answers=True, prompts="plain", exports=("hf", "gguf"), judged=True, replay=True, base_answers=True,
         searched_on="preference_accuracy"),
    Task("kto", "decoder", "answers prompts as preferred (KTO)", "tunelab.stages.kto",
         answers=True, prompts="plain", exports=("hf", "gguf"), judged=True, replay=True, base_answers=True,
         searched_on="preference_accuracy"),
    Task("grpo", "decoder", "answers prompts for a higher reward (GRPO)", "tunelab.stages.grpo",
         answers=True, prompts="template", exports=("hf", "gguf"), judged=True, base_answers=True,
         searched_on="mean_reward"),
    Task("embed", "embedder", "embeds texts so that each query finds its paired text (retrieval, similarity)",
         "tunelab.stages.embed", embeds=True, exports=("hf", "onnx"), pipeline_tag="sentence-similarity",
         searched_on="ndcg_at_10"),
)}

TASK_NAMES = tuple(TASKS)


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
