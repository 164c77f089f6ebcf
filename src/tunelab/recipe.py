"""The recipe: every option a run takes, its default and its one-line help; YAML loading and overrides.

The schema is the single source of truth: the CLI's `validate`, the docs and the saved `recipe.yaml` all come
from these classes.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import TunelabError
from tunelab.tasks import TASK_NAMES, TASKS, Task, tasks_that


class Section(BaseModel):
    """A recipe section: unknown keys are refused, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(description="Hub id, local model folder, .gguf file, earlier run folder, or offline alias "
                                  "(`tunelab models` lists them)")
    max_length: int = Field(256, ge=8, le=32768,
                            description="Inputs are truncated to this many tokens; batches pad to their longest row")
    new_head: bool = Field(False, description="Transfer to a new label set: keep the weights of model.name (e.g. an "
                                              "earlier run folder) but start a freshly initialised task head")


class ReplayConfig(Section):
    source: str = Field(description="General text mixed into training against forgetting: a Hub dataset id "
                                    "(resolved offline through TUNELAB_DATA_PATH) or a csv/json/jsonl/parquet file or "
                                    "folder")
    template: str = Field("{text}", description="The text of a replay row, as a Python format string over its columns "
                                                "(e.g. '{instruction}\\n{output}')")
    split: str = Field("train", description="Split of the replay source to draw rows from")
    fraction: float = Field(0.2, gt=0, le=4, description="Replay rows per task training row (0.2: one for every five), "
                                                          "drawn at random with data.seed; trained with the loss on "
                                                          "every token (dpo/kto: fraction × batch_size rows a step)")


class DataConfig(Section):
    source: str = Field(description="Hub dataset id (resolved offline through TUNELAB_DATA_PATH), a csv/json/jsonl/"
                                    "parquet file, or a folder holding train.*/test.*/validation.*")
    text: str = Field("text", description="Column holding the input text")
    text_pair: str | None = Field(None, description="Optional second text column (sentence pairs)")
    label: str = Field("label", description="Column holding the label (string or integer); kto: whether the "
                                            "completion is good (true/1/good) or bad (false/0/bad)")
    labels: list[str] | None = Field(None, description="Label names in order; integer labels index into this list. "
                                                       "Default: the sorted labels found in the training split")
    train_split: str = Field("train", description="Split to train on")
    eval_split: str | None = Field("test", description="Split scored before and after training; null holds out "
                                                       "`holdout_fraction` of the training split instead")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Stratified hold-out used when the eval split is "
                                                                 "null or the source has none")
    validation_split: str | None = Field(None, description="Split that picks the best checkpoint (tasks classify, "
                                                           "reward, sft, pretrain, seq2seq); null: the source's "
                                                           "'validation' split when it has one. Never the reported "
                                                           "eval split")
    validation_fraction: float | None = Field(None, gt=0, lt=1, description="Without a validation split: carve this "
                                              "fraction of train (seeded, stratified) to pick the best checkpoint on. "
                                              "Unset: no selection, the last checkpoint is the result")
    train_size: int | None = Field(None, ge=1, description="Stratified subsample of the training split")
    eval_size: int | None = Field(None, ge=1, description="Stratified subsample of the eval split")
    shots: int | None = Field(None, ge=1, description="Few-shot: train on exactly this many rows per class (seeded, "
                                                      "stratified); every class needs at least that many")
    drop_empty: bool = Field(False, description="Drop rows whose text is empty or missing instead of refusing them")
    drop_long: bool = Field(False, description="sft: drop rows whose prompt alone fills model.max_length (nothing of "
                                               "their response would be learned) instead of refusing them")
    streaming: bool = Field(False, description="pretrain/sft: read the train split as a stream, normalised and "
                                               "tokenized as training asks for rows and shuffled through a buffer, "
                                               "so memory stays flat however large the file. Needs train.max_steps "
                                               "and an eval split of its own; the eval and validation splits are "
                                               "read into memory as usual")
    format: Literal["auto", "instruction", "prompt_completion", "messages", "template"] = Field(
        "auto", description="sft/seq2seq: how rows become prompt → response. instruction: instruction/input/output "
                            "columns; prompt_completion: prompt/completion columns; messages: a chat column of "
                            "role/content turns (the last assistant turn is the response); template: "
                            "data.prompt_template / data.response_template. auto: template when prompt_template is "
                            "set, else the first whose columns are present")
    messages: str = Field("messages", description="sft: the column holding chat turns (format messages)")
    prompt_template: str | None = Field(None, description="sft/seq2seq: the prompt as a Python format string over the "
                                                          "row's columns, e.g. 'Symptoms: {text}'")
    response_template: str | None = Field(None, description="sft/seq2seq: the response as a format string, e.g. "
                                                            "'Diagnosis: {label_text}'")
    chat_template: str = Field("auto", description="sft: auto = the model's own chat template when it has one, else "
                                                   "plain text (Alpaca-style '### Instruction:' prompts); none = plain "
                                                   "text always; anything else = a Jinja chat template to use")
    prompt: str = Field("prompt", description="reward/dpo: the column holding the shared prompt (a missing column "
                                              "means chosen/rejected are whole transcripts)")
    chosen: str = Field("chosen", description="reward/dpo: the column holding the preferred response")
    rejected: str = Field("rejected", description="reward/dpo: the column holding the dispreferred response")
    completion: str = Field("completion", description="kto without chosen/rejected pairs: the column holding one "
                                                      "response, marked good or bad by data.label")
    seed: int = Field(42, description="Seed for subsampling, hold-out splits and few-shot sampling")
    replay: ReplayConfig | None = Field(None, description="sft/pretrain/dpo/kto: train on general text too, a lever "
                                                          "against forgetting (eval.retention measures it); sft and "
                                                          "pretrain mix it into the rows, dpo and kto add its "
                                                          "language-model loss to each step")

    @model_validator(mode="after")
    def _one_training_size(self) -> DataConfig:
        """shots and train_size both size the training split: one of them, so it is clear which wins."""
        if self.shots is not None and self.train_size is not None:
            raise ValueError("data.shots and data.train_size both size the training split; set only one of them")
        return self


class FullMethod(Section):
    name: Literal["full"] = Field("full", description="Train every weight")
    freeze_embeddings: bool = Field(False, description="Keep everything below the first transformer block (token and "
                                                       "position embeddings) frozen")
    layer_lr_decay: float | None = Field(None, gt=0, le=1, description="Discriminative learning rates: each block "
                                         "learns at this factor times the rate of the block above (head: full rate)")


class FreezeMethod(Section):
    name: Literal["freeze"] = Field(description="Transfer learning: train the head (and the top N layers) only")
    train_top_layers: int = Field(0, ge=0, description="How many of the top transformer layers train with the head")
    unfreeze_schedule: int | list[int] | None = Field(
        None, description="Gradual unfreezing: N → N more top layers each epoch (from train_top_layers); a list → "
                          "how many top layers train in epoch 1, 2, … (the last entry holds after)")
    layer_lr_decay: float | None = Field(None, gt=0, le=1, description="Discriminative learning rates: each block "
                                         "learns at this factor times the rate of the block above (head: full rate)")

    @model_validator(mode="after")
    def _check_schedule(self) -> FreezeMethod:
        """A list schedule only ever unfreezes: non-negative, non-decreasing, starting at train_top_layers."""
        schedule = self.unfreeze_schedule
        if isinstance(schedule, int) and schedule < 1:
            raise ValueError("method.unfreeze_schedule as a number is how many layers unfreeze per epoch: use ≥ 1")
        if isinstance(schedule, list):
            if not schedule or min(schedule) < 0 or any(b < a for a, b in zip(schedule, schedule[1:], strict=False)):
                raise ValueError("method.unfreeze_schedule must be a non-empty, non-decreasing list of layer counts "
                                 "(e.g. [0, 1, 2]); layers are never frozen again")
            if self.train_top_layers not in (0, schedule[0]):
                raise ValueError("method.unfreeze_schedule gives the layers per epoch itself; drop train_top_layers")
        return self


class LoraMethod(Section):
    name: Literal["lora", "dora", "qlora"] = Field(description="Low-rank adapters (DoRA: weight-decomposed LoRA; "
                                                              "QLoRA: LoRA on a 4-bit base, CUDA only)")
    r: int = Field(16, ge=1, description="Adapter rank")
    alpha: int | None = Field(None, ge=1, description="Scaling numerator; default 2 × r")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules that get adapters: names, or 'all-linear' (every linear layer but the head)")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale the adapter by alpha/√r instead of "
                                                "alpha/r, so that higher ranks keep learning")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="How adapters start (all add nothing at first): default: A Kaiming-uniform, B zero; "
                               "gaussian: A Gaussian, B zero; pissa: each weight's top-r singular components moved "
                               "from the base into the adapter; olora: its top-r QR factors moved likewise. A pissa "
                               "or olora run saves a plain LoRA adapter of rank 2r for the original base")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: the B matrices (and 1-D weights) learn at "
                                            "this ratio times the learning rate (the paper: 16); unset: one rate")

    @model_validator(mode="after")
    def _default_alpha(self) -> LoraMethod:
        """alpha = 2 × r unless given (measured to learn faster on small data than alpha = r)."""
        if self.alpha is None:
            self.alpha = 2 * self.r
        return self

    @model_validator(mode="after")
    def _moved_base_on_plain_lora(self) -> LoraMethod:
        """pissa/olora runs are saved as plain LoRA on the original base, which dora and qlora cannot be."""
        if self.init_lora_weights in MOVED_BASE_INITS and self.name != "lora":
            why = ("peft's conversion to a plain adapter drops DoRA's magnitudes" if self.name == "dora" else
                   "a 4-bit base quantizes the residual, so the converted adapter on the original base is not the "
                   "trained model")
            raise ValueError(f"method.init_lora_weights {self.init_lora_weights} moves part of each base weight into "
                             f"the adapter, and {why}; use method lora or init_lora_weights default")
        return self


MOVED_BASE_INITS = ("pissa", "olora")  # inits that move part of each base weight into the adapter


class IA3Method(Section):
    name: Literal["ia3"] = Field(description="(IA)³: learned rescaling of keys, values and feed-forward activations")
    target_modules: list[str] | None = Field(None, description="Default: peft's choice for the architecture")
    feedforward_modules: list[str] | None = Field(None, description="Default: peft's choice for the architecture")


class VirtualTokenMethod(Section):
    name: Literal["prefix", "prompt"] = Field(description="Prefix tuning or prompt tuning: trainable virtual tokens")
    num_virtual_tokens: int = Field(20, ge=1, description="How many virtual tokens are learned")


Method = Annotated[FullMethod | FreezeMethod | LoraMethod | IA3Method | VirtualTokenMethod,
                   Field(discriminator="name")]

METHOD_CLASSES: dict[str, type[Section]] = {"full": FullMethod, "freeze": FreezeMethod, "lora": LoraMethod,
                                             "dora": LoraMethod, "qlora": LoraMethod, "ia3": IA3Method,
                                             "prefix": VirtualTokenMethod, "prompt": VirtualTokenMethod}

# Learning rates that learn on small data with each method (measured on the examples; see README).
DEFAULT_LEARNING_RATES = {"full": 1e-4, "freeze": 1e-3, "lora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "ia3": 5e-3,
                          "prefix": 1e-2, "prompt": 1e-2}


VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")  # peft prepends virtual tokens and ignores position ids


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="How several processes (tunelab train --nproc, torchrun) share the work. ddp: a full "
                           "model copy per process; fsdp: parameters, gradients and optimizer state sharded over "
                           "the processes (transformers' FSDP2; tasks sft and pretrain, method full); deepspeed: "
                           "DeepSpeed ZeRO (train.distributed.deepspeed picks the stage). All run on CPU and GPU")
    sharding: Literal["full", "hybrid"] = Field(
        "full", description="fsdp: full shards over every process; hybrid shards within each machine and "
                            "replicates across machines (less traffic between machines)")
    deepspeed: str = Field(
        "zero2", description="deepspeed: a ZeRO preset (zero2: optimizer state and gradients sharded; zero3: "
                             "parameters too; zero3_offload: zero3 with parameters and optimizer state held in CPU "
                             "memory, for GPUs) or the path of a DeepSpeed JSON config with ZeRO stage 2 or 3")

    @model_validator(mode="after")
    def options_match_the_strategy(self) -> DistributedConfig:
        # Against the defaults, not the keys set: a resolved recipe (the run folder's recipe.yaml) lists them all.
        for key, owner in (("sharding", "fsdp"), ("deepspeed", "deepspeed")):
            if getattr(self, key) != type(self).model_fields[key].default and self.strategy != owner:
                raise ValueError(f"train.distributed.{key} applies to strategy {owner}, not {self.strategy}; set "
                                 f"train.distributed.strategy: {owner} or drop train.distributed.{key}")
        return self


class TrainConfig(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training split (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps instead of epochs")
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate; default depends on the method")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps spent warming up")
    batch_size: int = Field(16, ge=1, description="Rows per batch across all processes (split evenly over them); "
                                                  "an optimizer step sees batch_size × grad_accum rows")
    grad_accum: int = Field(1, ge=1, description="Batches accumulated per optimizer step")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the CPU/GPU supports it, else fp32")
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout")
    checkpoint_every: int | None = Field(None, ge=1, description="Evaluate and checkpoint every N steps "
                                                                 "(default: every epoch)")
    group_by_length: bool = Field(True, description="Batch rows of similar length together to cut padding")
    logging_steps: int = Field(10, ge=1, description="Log loss every N steps")
    completion_only_loss: bool = Field(True, description="sft: train on the response tokens only (prompt tokens get "
                                                         "label -100); false trains on the whole sequence")
    packing: bool = Field(False, description="sft/pretrain: pack several short rows into one sequence without padding "
                                             "(position ids restart per row, so rows never attend to each other); "
                                             "pretrain always chunks its text to model.max_length blocks")
    padding_free: bool = Field(True, description="sft: concatenate a batch's rows into one sequence instead of "
                                                 "padding them (position ids restart per row, so rows never attend "
                                                 "to each other): the same loss for less compute. Prompt and prefix "
                                                 "tuning train padded (peft drops position ids for them)")
    neftune_noise_alpha: float | None = Field(None, gt=0, description="sft: NEFTune, uniform noise of this scale "
                                              "(the paper: 5) added to the token embeddings in training steps, not "
                                              "in evaluation; trains padded batches (train.padding_free false)")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                                            "memory, about a third more compute")
    speedups: bool = Field(True, description="tunelab's CPU speed-ups (fused LM head and LoRA, row-by-row attention, "
                                             "cheap dropout, heap and batch order); false: the libraries' own paths")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="Training on several processes or machines")
    report_to: list[Literal["tensorboard", "mlflow", "trackio", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that get the training logs, the before/after metrics "
                                          "and the resolved recipe (MLflow: a local store in the run folder unless "
                                          "MLFLOW_TRACKING_URI is set; TensorBoard: <run>/tensorboard). [] = none")


class GenerateConfig(Section):
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer")
    num_samples: int = Field(50, ge=0, description="Score generations on this many eval rows (0: skip); the first "
                                                   "rows of the eval split, the same before and after")
    temperature: float = Field(0.0, ge=0, description="0: greedy decoding (reproducible); above 0: sampling")
    batch_size: int = Field(16, ge=1, description="Prompts generated together")


DPO_LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}  # recipe name → TRL loss_type
REFERENCE_FREE_LOSSES = ("simpo", "cpo", "orpo")  # TRL's CPO / ORPO trainers: no reference model at all
DEFAULT_BETAS = {"simpo": 2.0}  # SimPO's paper uses β 2–2.5 on its length-normalised reward; the others 0.1


class PreferenceConfig(Section):
    """Options of task dpo (the `preference` section)."""

    loss: Literal["dpo", "ipo", "hinge", "robust", "simpo", "cpo", "orpo"] = Field(
        "dpo", description="dpo: the DPO loss (sigmoid); ipo: identity preference optimisation; hinge: SLiC's hinge "
                           "loss; robust: DPO robust to label noise; simpo: SimPO (length-normalised, no reference "
                           "model); cpo: contrastive preference optimisation (DPO-style loss without reference + an "
                           "NLL term on chosen); orpo: odds-ratio preference optimisation (SFT loss + odds-ratio "
                           "penalty, no reference). simpo/cpo/orpo use TRL's experimental CPO/ORPO trainers")
    beta: float | None = Field(None, gt=0, description="dpo/ipo/hinge/robust: how far the policy may move from the "
                                                       "reference model (default 0.1); simpo: reward scale (default "
                                                       "2.0); cpo: loss temperature (0.1); orpo: weight of the "
                                                       "odds-ratio term (λ, 0.1)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin over beta (γ/β)")

    @model_validator(mode="after")
    def _default_beta(self) -> PreferenceConfig:
        """Write the loss's usual beta out, so the saved recipe says what ran."""
        if self.beta is None:
            self.beta = DEFAULT_BETAS.get(self.loss, 0.1)
        return self


class KtoConfig(Section):
    """Options of task kto (the `preference` section)."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference model")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the loss on good completions (raise it when "
                                                           "bad ones outnumber good ones)")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the loss on bad completions")


class RewardSource(Section):
    function: str | None = Field(None, description="A built-in reward (exact_match, known_answer, brevity) or your "
                                                   "own as 'module:function' (called with prompts, completions and "
                                                   "the data columns; returns one float per completion)")
    model: str | None = Field(None, description="A reward-model run folder (task reward) that scores prompt + "
                                                "completion")

    def describe(self) -> str:
        """The source in a word: the function's name or the reward run's folder."""
        return self.function or self.model or "none"


class GrpoConfig(Section):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt; each is scored against the "
                                                      "group's mean reward")
    max_new_tokens: int = Field(32, ge=1, description="Longest completion generated in training")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the training completions")
    beta: float = Field(0.0, ge=0, description="Weight of the KL penalty towards the starting model (0: none, "
                                               "TRL's default; no reference model is kept)")


class RetentionConfig(Section):
    enabled: bool = Field(False, description="Decoders (sft, pretrain, dpo, kto, grpo): score general-ability probes "
                                             "before and after training, to see what fine-tuning cost (forgetting)")
    probes: list[str] = Field(["piqa", "wikitext"], min_length=1, description="Built-in probes (piqa: multiple "
                              "choice; wikitext: perplexity) or your own: a .jsonl of {goal, choices, label} rows "
                              "(multiple choice) or a text file (perplexity)")
    size: int | None = Field(300, ge=1, description="Items scored per multiple-choice probe (a seeded sample, the "
                                                    "same before and after; null: all)")
    documents: int | None = Field(2, ge=1, description="Documents scored per perplexity probe (the first ones; "
                                                       "null: all)")
    max_length: int = Field(512, ge=16, description="Perplexity window in tokens (each token is scored once, "
                                                     "after up to this many tokens of context)")
    batch_size: int = Field(16, ge=1, description="Sequences scored together")


class EvalConfig(Section):
    batch_size: int = Field(64, ge=1, description="Rows per batch when scoring")
    best_metric: Literal["accuracy", "macro_f1", "loss"] = Field(
        "accuracy", description="Metric that picks the best checkpoint")
    select_best: bool = Field(True, description="Keep the checkpoint that scored best on the validation split "
                                                "(data.validation_split, or data.validation_fraction of train) when "
                                                "there is one; the reported eval split never picks it. Without one, "
                                                "or false: the last checkpoint")
    each_epoch: bool = Field(False, description="Without a validation split: also score the reported eval split after "
                                                "every epoch, for the curve in the report (it never picks the "
                                                "checkpoint; costs one evaluation per epoch)")
    in_context_shots: int | None = Field(None, ge=1, description="Decoders: also score the untrained model prompted "
                                                                 "with this many labelled examples per class (a "
                                                                 "baseline for what fine-tuning buys)")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="sft/seq2seq: generation-based "
                                     "scores (exact match, ROUGE-L) on a sample of the eval split")
    judge: RewardSource | None = Field(None, description="dpo/grpo: a reward-model run or reward function that "
                                       "judges the trained model's answers to the generation samples against the "
                                       "starting model's answers (win rate)")
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="Decoders: general ability "
                                       "before and after (PIQA, WikiText), with paired intervals")


class FewshotConfig(Section):
    """SetFit-style few-shot classification (task: fewshot): contrastive pairs tune the encoder, then a head is fit.

    The batch size, warm-up, weight decay, seed and logging come from `train`; train.epochs, train.learning_rate
    and train.max_steps are for classify and unused here. Training runs in fp32: with bf16 autocast the cosine
    similarities lose so much precision that the contrastive loss stalled (measured on the symptom example).
    """

    pairs_per_example: int = Field(20, ge=1, description="Per training row and epoch: this many same-label "
                                                         "(positive) and as many different-label (negative) pairs")
    epochs: float = Field(1, gt=0, description="Passes over the generated pairs")
    max_pairs: int | None = Field(None, ge=1, description="Train on at most this many pairs in all (caps the cost "
                                                          "when there are many training rows, e.g. in a curve)")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate of the encoder's contrastive training")
    loss: Literal["cosine", "contrastive"] = Field(
        "cosine", description="cosine: pull pair similarity to 1 / 0 (SetFit's default); contrastive: pull positives "
                              "together, push negatives only until they are a margin apart")
    head_c: float = Field(10.0, gt=0, description="Inverse L2 strength of the logistic-regression head (sklearn's "
                                                  "default 1 is too strong for unit-length embeddings)")


class EmbedConfig(Section):
    """Sentence-embedding training for retrieval or similarity (task: embed), with sentence-transformers' trainer.

    The pairs come from data.text (query) and data.text_pair (the text it should find); scored pairs also from
    data.label (their similarity). Epochs, batch size, learning rate and the rest come from `train`.
    """

    loss: Literal["auto", "mnrl", "cosent"] = Field(
        "auto", description="mnrl: MultipleNegativesRankingLoss, each query against its own positive and every other "
                            "positive of the batch (batches never hold the same text twice); cosent: CoSENTLoss on "
                            "pairs scored by data.label (only the order of the scores matters); auto: cosent when "
                            "data.label is set in the recipe, else mnrl")


class OutputConfig(Section):
    root: str = Field("runs", description="Folder that holds run folders when --output is not given")
    keep_checkpoints: bool = Field(False, description="Keep intermediate checkpoints after a successful run")


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def slug(text: str) -> str:
    """A run name made from a file name (`my recipe (v2)` → `my-recipe-v2`), for recipes that name none."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip("-._")[:128].rstrip("-") or "run"


class Recipe(Section):
    """What every task's recipe holds. Each task has its own variant below (`ClassifyRecipe`, `DpoRecipe`, …), with
    the sections only it takes and the checks only it needs; `RECIPES` picks the variant by `task`."""

    name: str = Field(description="Run name: letters, digits, '-', '_' and '.', starting with a letter or digit, at "
                                  "most 128 characters; default: the recipe file's name")
    task: Literal[TASK_NAMES] = Field(description="What to train: " + "; ".join(
        f"{name} ({task.summary})" for name, task in TASKS.items()))
    model: ModelConfig
    data: DataConfig
    method: Method = Field(default_factory=FullMethod, description="How weights are trained")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @property
    def entry(self) -> Task:
        """The task's registry entry: what it trains and what its runs support."""
        return TASKS[self.task]

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        """Run folders and the board's files are named after the run, so a name is a slug: never a path (`../x`,
        `/tmp/x`), a hidden or special folder (`.`, `..`), or longer than a file name may be."""
        if not RUN_NAME.fullmatch(name):
            raise ValueError(f"'name' = {name!r} is not a valid run name; use letters, digits, '-', '_' and '.' "
                             f"(starting with a letter or digit, at most 128 characters), e.g. my-run")
        return name

    @model_validator(mode="before")
    @classmethod
    def _method_shorthand(cls, raw: Any) -> Any:
        """Accept `method: lora` as shorthand for `method: {name: lora}`."""
        if isinstance(raw, dict) and isinstance(raw.get("method"), str):
            raw = {**raw, "method": {"name": raw["method"]}}
        return raw

    @model_validator(mode="after")
    def _check_qlora(self) -> Recipe:
        """QLoRA quantizes a decoder's base for generative training; classifiers use lora."""
        if self.method.name == "qlora" and not self.entry.decoder:
            raise ValueError(f"method qlora is for decoder training (tasks {', '.join(tasks_that('decoder'))}); use "
                             f"lora for task {self.task}")
        return self

    @model_validator(mode="after")
    def _check_streaming(self) -> Recipe:
        """A streamed train split is never whole in memory and has no length: refuse what needs either."""
        data = self.data
        if not data.streaming:
            return self
        if not self.entry.streaming:
            raise ValueError(f"data.streaming is for tasks {', '.join(tasks_that('streaming'))}; drop it for task "
                             f"{self.task}")
        if self.train.max_steps is None:
            raise ValueError("data.streaming reads the train split as a stream of unknown length, so epochs cannot "
                             "be counted; set train.max_steps (rows read = max_steps × batch_size × grad_accum)")
        whole_split = {"data.train_size": data.train_size, "data.shots": data.shots,
                       "data.validation_fraction": data.validation_fraction}
        for field, value in whole_split.items():
            if value is not None:
                raise ValueError(f"{field} samples from the whole train split, which data.streaming never holds; "
                                 f"drop {field} (train.max_steps caps how much of the stream a run reads; a "
                                 f"validation split of the source picks checkpoints)")
        if data.eval_split is None:
            raise ValueError("data.eval_split null holds eval rows out of the train split, which data.streaming "
                             "never holds; name a split of the source to score on (e.g. test)")
        if "group_by_length" in self.train.model_fields_set and self.train.group_by_length:
            raise ValueError("train.group_by_length sorts the whole train split by length, which data.streaming "
                             "never holds; drop it (streamed rows train in the shuffled stream's order)")
        self.train.group_by_length = False  # the saved recipe says what ran: the stream's own order
        return self

    @model_validator(mode="after")
    def _check_judge(self) -> Recipe:
        """A judge compares answers before and after training: tasks that generate them, one source, samples."""
        judge = self.eval.judge
        if judge is None:
            return self
        if not self.entry.judged:
            raise ValueError(f"eval.judge scores the answers of tasks {', '.join(tasks_that('judged'))}; drop it for "
                             f"task {self.task}")
        if (judge.function is None) == (judge.model is None):
            raise ValueError("eval.judge needs one source: set eval.judge.model (a reward-model run folder) or "
                             "eval.judge.function (e.g. exact_match, or module:function)")
        if self.eval.generate.num_samples == 0:
            raise ValueError("eval.judge compares generated answers, and eval.generate.num_samples is 0; set it to "
                             "the number of prompts to judge (e.g. 32)")
        return self

    @model_validator(mode="after")
    def _check_retention(self) -> Recipe:
        """Probes of general ability score a causal LM's text likelihood; replay mixes text into LM training."""
        if self.eval.retention.enabled and not self.entry.decoder:
            raise ValueError(f"eval.retention scores decoders (tasks {', '.join(tasks_that('decoder'))}); drop it for "
                             f"task {self.task}")
        if self.data.replay is not None:
            if not self.entry.replay:
                raise ValueError(f"data.replay trains on general text alongside the task (tasks "
                                 f"{', '.join(tasks_that('replay'))}); drop it for task {self.task}")
            if self.data.streaming:
                raise ValueError("data.replay samples rows in proportion to the train split, which data.streaming "
                                 "never holds; drop one of them")
        return self

    @model_validator(mode="after")
    def _check_lora_options(self) -> Recipe:
        """pissa/olora change the base weights (a head or a reference model needs them as they were) and convert
        the adapter at save from this process's copy; LoRA+ builds the optimizer's groups in the Trainer."""
        method = self.method
        if not isinstance(method, LoraMethod):
            return self
        moved = method.init_lora_weights in MOVED_BASE_INITS
        if moved and not self.entry.moved_base:
            raise ValueError(f"method.init_lora_weights {method.init_lora_weights} moves part of each base weight "
                             f"into the adapter, and task {self.task} needs the base as it was (its head or its "
                             f"reference model); use it with tasks {', '.join(tasks_that('moved_base'))}, or "
                             f"init_lora_weights default")
        if self.train.distributed.strategy != "deepspeed":
            return self
        if moved:
            raise ValueError(f"method.init_lora_weights {method.init_lora_weights} is converted to plain LoRA at save "
                             f"from the adapter this process holds, which DeepSpeed may shard (ZeRO-3); use "
                             f"train.distributed.strategy ddp or init_lora_weights default")
        if method.loraplus_lr_ratio is not None:
            raise ValueError("method.loraplus_lr_ratio builds the optimizer's learning-rate groups in the Trainer, "
                             "which a DeepSpeed config may replace with its own optimizer; use "
                             "train.distributed.strategy ddp or drop method.loraplus_lr_ratio")
        return self

    @model_validator(mode="after")
    def _check_neftune(self) -> Recipe:
        """NEFTune is for instruction tuning, in padded batches (transformers scales the noise by a batch row's length,
        and a padding-free or packed batch is one row of many)."""
        if self.train.neftune_noise_alpha is None:
            return self
        if not self.entry.neftune:
            raise ValueError(f"train.neftune_noise_alpha adds noise to the embeddings in instruction tuning (tasks "
                             f"{', '.join(tasks_that('neftune'))}); drop it for task {self.task}")
        explicit = [key for key in ("padding_free", "packing")
                    if key in self.train.model_fields_set and getattr(self.train, key)]
        if explicit:
            raise ValueError(f"train.neftune_noise_alpha scales its noise by the length of a batch row, and "
                             f"train.{explicit[0]} makes a batch one row of all its rows (far weaker noise); drop "
                             f"train.{explicit[0]}")
        self.train.padding_free = False  # the saved recipe says what ran: padded batches
        return self

    @model_validator(mode="after")
    def _fill_method_defaults(self) -> Recipe:
        """Make defaults that depend on the method explicit, so the saved recipe re-runs exactly."""
        if self.train.learning_rate is None:
            self.train.learning_rate = DEFAULT_LEARNING_RATES[self.method.name]
        return self

    def to_yaml(self) -> str:
        """The resolved recipe as YAML: every default written out."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Each task's recipe: its own sections and the checks only it needs. A section of another task is refused as an
# unknown key, in one line that names the sections this task takes.

class ClassifyRecipe(Recipe):
    task: Literal["classify"]


class FewshotRecipe(Recipe):
    task: Literal["fewshot"]
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig, description="Options of task fewshot")

    @model_validator(mode="after")
    def _what_setfit_honours(self) -> FewshotRecipe:
        """fewshot trains the whole sentence encoder on single texts through SetFit; refuse what it cannot honour."""
        if not isinstance(self.method, FullMethod) or self.method != FullMethod():
            raise ValueError("task fewshot tunes the whole sentence encoder contrastively; use method: full "
                             "(without options), or task: classify for other methods")
        if self.data.text_pair is not None:
            raise ValueError("task fewshot classifies single texts; drop data.text_pair or use task: classify")
        if self.train.report_to:
            raise ValueError("train.report_to hands the Trainer's logs to trackers, and task fewshot trains through "
                             "SetFit without them; drop train.report_to or use task: classify")
        if self.train.precision == "bf16":
            raise ValueError("task fewshot trains in fp32 (bf16 stalls its contrastive loss); set train.precision "
                             "to auto or fp32")
        if self.eval.in_context_shots is not None:
            raise ValueError("eval.in_context_shots prompts a decoder, and task fewshot tunes an encoder; drop it")
        return self


class PickedByLossRecipe(Recipe):
    """A task without accuracy during training: its checkpoints are picked by eval loss, and the in-context
    classification baseline means nothing for it."""

    @model_validator(mode="after")
    def _picked_by_loss(self) -> PickedByLossRecipe:
        if "best_metric" in self.eval.model_fields_set and self.eval.best_metric != "loss":
            raise ValueError(f"task {self.task} picks the best checkpoint by eval loss; set eval.best_metric: loss")
        if self.eval.in_context_shots is not None:
            raise ValueError(f"eval.in_context_shots is a classification baseline; drop it for task {self.task}")
        self.eval.best_metric = "loss"
        return self


class TextRecipe(PickedByLossRecipe):
    """sft, pretrain and seq2seq: a model trained on text (exact match and ROUGE-L are scored after training)."""

    @model_validator(mode="after")
    def _rows_apart(self) -> TextRecipe:
        if self.train.packing and self.method.name in VIRTUAL_TOKEN_METHODS:
            raise ValueError(f"train.packing needs position ids that restart per row, and peft drops them for method "
                             f"{self.method.name}; drop train.packing or use lora")
        return self


class SftRecipe(TextRecipe):
    task: Literal["sft"]


class PretrainRecipe(TextRecipe):
    task: Literal["pretrain"]

    @model_validator(mode="after")
    def _no_labels(self) -> PretrainRecipe:
        if self.data.shots is not None:
            raise ValueError("data.shots samples k rows per label, and task pretrain has no labels; use "
                             "data.train_size")
        return self


class Seq2seqRecipe(TextRecipe):
    task: Literal["seq2seq"]

    @model_validator(mode="after")
    def _no_packing(self) -> Seq2seqRecipe:
        if self.train.packing:
            raise ValueError("train.packing is for decoders (sft, pretrain); drop it for task seq2seq")
        return self


class PairsRecipe(PickedByLossRecipe):
    """reward, dpo and kto: trained on chosen/rejected pairs (kto: also single marked responses), so no labels to
    sample shots from, and no packing."""

    @model_validator(mode="after")
    def _pairs_not_labels(self) -> PairsRecipe:
        if self.data.shots is not None:
            raise ValueError(f"data.shots samples k rows per label, and task {self.task} has pairs, not labels; use "
                             f"data.train_size")
        if self.train.packing:
            raise ValueError(f"train.packing is for sft and pretrain; drop it for task {self.task}")
        return self


class RewardRecipe(PairsRecipe):
    task: Literal["reward"]


class DpoRecipe(PairsRecipe):
    task: Literal["dpo"]
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="Options of task dpo")


class KtoRecipe(PairsRecipe):
    task: Literal["kto"]
    preference: KtoConfig = Field(default_factory=KtoConfig, description="Options of task kto")

    @model_validator(mode="after")
    def _batches_of_two(self) -> KtoRecipe:
        if self.train.batch_size < 2:
            raise ValueError("task kto estimates its KL term from the other rows of each batch; set train.batch_size "
                             "to 2 or more")
        return self


class GrpoRecipe(Recipe):
    task: Literal["grpo"]
    reward: RewardSource = Field(default_factory=RewardSource, description="Where rewards come from (set function "
                                                                           "or model)")
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="Options of task grpo")

    @model_validator(mode="after")
    def _one_source_whole_groups(self) -> GrpoRecipe:
        """grpo needs exactly one reward source and whole groups of completions in every step."""
        if (self.reward.function is None) == (self.reward.model is None):
            raise ValueError("task grpo needs one reward source: set reward.function (e.g. exact_match, or "
                             "module:function) or reward.model (a reward-model run folder)")
        rows = self.train.batch_size * self.train.grad_accum
        if rows % self.grpo.num_generations:
            raise ValueError(f"train.batch_size × train.grad_accum ({rows}) must be a multiple of "
                             f"grpo.num_generations ({self.grpo.num_generations}): each step scores whole groups")
        if self.data.shots is not None or self.eval.in_context_shots is not None or self.train.packing:
            raise ValueError("task grpo takes none of data.shots, eval.in_context_shots, train.packing; drop them")
        self.eval.select_best = False  # no eval loss to pick a checkpoint by: the last one is the result
        return self


class EmbedRecipe(Recipe):
    task: Literal["embed"]
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="Options of task embed")

    @model_validator(mode="after")
    def _pairs_whole_encoder(self) -> EmbedRecipe:
        """embed tunes a whole sentence encoder on text pairs and keeps its last checkpoint; `auto` is written out
        as the loss it picks, so the saved recipe re-runs exactly."""
        if not isinstance(self.method, FullMethod) or self.method != FullMethod():
            raise ValueError("task embed tunes the whole sentence encoder; use method: full (without options)")
        if self.data.text_pair is None:
            raise ValueError("task embed trains on (query, positive) pairs; set data.text to the query column and "
                             "data.text_pair to the column of the text each query should find")
        dropped = {"data.shots": self.data.shots, "data.validation_fraction": self.data.validation_fraction,
                   "eval.in_context_shots": self.eval.in_context_shots}
        for field, value in dropped.items():
            if value is not None:
                raise ValueError(f"task embed takes no {field} (it trains on all pairs and keeps its last "
                                 f"checkpoint); drop {field}")
        if self.train.packing:
            raise ValueError("train.packing is for sft and pretrain; drop it for task embed")
        if self.embed.loss == "auto":
            self.embed.loss = "cosent" if "label" in self.data.model_fields_set else "mnrl"
        self.eval.select_best = False  # no split picks a checkpoint: the last one is the result
        return self


RECIPE_CLASSES: dict[str, type[Recipe]] = {
    "classify": ClassifyRecipe, "fewshot": FewshotRecipe, "sft": SftRecipe, "pretrain": PretrainRecipe,
    "seq2seq": Seq2seqRecipe, "reward": RewardRecipe, "dpo": DpoRecipe, "kto": KtoRecipe, "grpo": GrpoRecipe,
    "embed": EmbedRecipe}
assert set(RECIPE_CLASSES) == set(TASK_NAMES), "every task in tasks.py has its recipe class here"

# What a recipe.yaml written before tasks had their own recipe classes lists for every task: the task sections and
# keys below, at these defaults. They are dropped when a task does not take them and they hold these values (a run
# folder of an older tunelab still loads) or null, and refused as unknown keys otherwise.
FLAT_RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "fewshot": FewshotConfig().model_dump(mode="json"),
    "preference": {"loss": "dpo", "beta": 0.1, "simpo_gamma": 0.5, "desirable_weight": 1.0,
                   "undesirable_weight": 1.0},
    "reward": RewardSource().model_dump(mode="json"),
    "grpo": GrpoConfig().model_dump(mode="json"),
}


def without_flat_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` without the default task sections (and keys) an older, flat recipe.yaml wrote for every task."""
    variant = RECIPE_CLASSES.get(raw.get("task")) if isinstance(raw.get("task"), str) else None
    if variant is None:
        return raw
    kept = dict(raw)
    for section, defaults in FLAT_RECIPE_DEFAULTS.items():
        value = kept.get(section)
        if section not in variant.model_fields:
            if section in kept and value in (defaults, None):  # null: left out (an override `fewshot=null`)
                del kept[section]
        elif isinstance(value, dict):
            own = model_class_of(variant.model_fields[section].annotation).model_fields
            kept[section] = {key: item for key, item in value.items()
                             if key in own or key not in defaults or item != defaults[key]}
    return kept


def model_class_of(annotation: Any) -> type[BaseModel]:
    """The section class of a field's annotation (`Section` or `Section | None`)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    raise TypeError(f"{annotation} holds no section")


def owners_of(section: str) -> list[str]:
    """The tasks whose recipes take `section`."""
    return [name for name, cls in RECIPE_CLASSES.items() if section in cls.model_fields]


def task_sections(task: str) -> list[str]:
    """The top-level keys a recipe of `task` takes."""
    return list(RECIPE_CLASSES[task].model_fields)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `dotted.key=value` overrides and validate it, or raise TunelabError."""
    return validate_recipe(read_raw_recipe(path, overrides), source=str(path))


def read_raw_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML recipe as written, with `dotted.key=value` overrides applied, not yet validated (`tunelab tune` sets
    its trials' values in it, so that defaults that follow other keys, such as LoRA's alpha = 2 × r, follow them)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"recipe file '{path}' does not exist; give the path to a .yaml recipe "
                           f"(see examples/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TunelabError(f"recipe '{path}' is not valid YAML{where}: "
                           f"{getattr(exc, 'problem', exc)}; fix the syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TunelabError(f"recipe '{path}' must be a mapping of sections (model, data, task, …), "
                           f"not a {type(raw).__name__}")
    if "stages" in raw and "task" not in raw:
        raise TunelabError(f"'{path}' is a pipeline (stages: {', '.join(map(str, raw['stages'] or []))}), not a "
                           f"recipe: run `tunelab pipeline {path}`")
    raw.setdefault("name", slug(path.stem))
    for override in overrides or []:
        apply_override(raw, override)
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a raw recipe dict; the value is parsed as YAML (`3`, `1e-4`, `[q, v]`, `null`)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise TunelabError(f"override '{override}' is not of the form dotted.key=value (e.g. train.epochs=3)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    set_dotted(raw, key.strip(), value, f"override '{override}'")


def set_dotted(raw: dict[str, Any], key: str, value: Any, what: str) -> None:
    """Set `a.b.c` to `value` in a raw recipe dict, creating sections on the way (`what` names the setting in the
    error when a part of the path is a value)."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "method":
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise TunelabError(f"{what}: '{part}' is a value, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw recipe dict into its task's recipe class, turning the first schema problem into a one-line
    error."""
    try:
        return recipe_from(raw)
    except ValidationError as exc:
        raise TunelabError(f"{source}: {describe_validation_error(exc)}") from None


def recipe_from(raw: Any) -> Recipe:
    """The recipe of `raw`'s task, validated by its task's class (pydantic's ValidationError on a problem); a run
    folder's recipe.yaml written by an older tunelab loads too. Without a known task, the shared class validates it:
    it refuses the task, and names what else is missing."""
    task = raw.get("task") if isinstance(raw, dict) else None
    variant = RECIPE_CLASSES.get(task) if isinstance(task, str) else None
    if variant is None:
        return Recipe.model_validate(raw)
    return variant.model_validate(without_flat_defaults(raw))


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the field, what is wrong with it and how to fix it."""
    problems = []
    task = next((name for name, cls in RECIPE_CLASSES.items() if cls.__name__ == exc.title), None)
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        # A discriminated union puts the chosen variant's tag in the path (method.lora.r): drop it.
        variant = loc.pop(1) if len(loc) > 1 and loc[0] == "method" and loc[1] in METHOD_CLASSES else None
        field = ".".join(loc) or "recipe"
        kind = err["type"]
        if kind == "extra_forbidden" and len(loc) == 1 and task is not None and owners_of(field):
            problems.append(f"section '{field}' configures task {', '.join(owners_of(field))}, not {task}; task "
                            f"{task} takes {', '.join(task_sections(task))}")
        elif kind == "extra_forbidden":
            allowed = list(METHOD_CLASSES[variant].model_fields) if variant else _allowed_keys(loc[:-1], task)
            problems.append(f"unknown key '{field}'" + (f"; valid keys here: {', '.join(allowed)}" if allowed else ""))
        elif kind == "missing":
            problems.append(f"'{field}' is required; add it to the recipe")
        elif kind == "union_tag_invalid":
            problems.append(f"'{field}.name' must be one of {', '.join(DEFAULT_LEARNING_RATES)}"
                            f" (got {err['input'].get('name')!r})" if isinstance(err["input"], dict)
                            else f"'{field}' is invalid: {err['msg']}")
        elif kind == "value_error":  # a validator's own message already names the field and the fix
            problems.append(err["msg"].removeprefix("Value error, "))
        elif kind == "union_tag_not_found":
            problems.append(f"'{field}' needs a 'name' (one of {', '.join(DEFAULT_LEARNING_RATES)})")
        else:
            problems.append(f"'{field}' = {err.get('input')!r} is invalid: {err['msg']}")
    return "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")


def _allowed_keys(loc: list[str], task: str | None) -> list[str]:
    """The keys a recipe section accepts, following a validation error's path."""
    model: type[BaseModel] = RECIPE_CLASSES.get(task, Recipe)
    for part in loc:
        annotation = model.model_fields.get(part)
        if annotation is None:
            return []
        try:
            model = model_class_of(annotation.annotation)
        except TypeError:
            return []
    return list(model.model_fields)
