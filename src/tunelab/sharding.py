"""How the model's state is split over the processes of one run: DDP (a full copy each), FSDP or DeepSpeed ZeRO.

The engines are the libraries': this module only turns `train.distributed` into their options, and refuses, in one
line and before any process starts, what they would not do as asked:

- FSDP is transformers' own FSDP2 (`from_pretrained(distributed_config=…)` shards the model as it loads, and the
  Trainer then leaves it to FSDP instead of wrapping it in DDP). It runs on CPU (gloo) and CUDA. accelerate's FSDP
  plugin is not used: it applies FSDP on GPUs only and on CPU processes silently trains plain DDP instead
  (measured: `fsdp=True` under gloo gives a DistributedDataParallel model). transformers' FSDP2 does not take peft
  adapters yet, so fsdp trains decoders in full (sft, pretrain).
- DeepSpeed ZeRO-2/3 runs on CPU too (DeepSpeed's CPU accelerator, gloo): the presets below, or a user's JSON
  config, whose batch sizes and precision must be left to the recipe ("auto"), so that a recipe means the same
  under every strategy.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.recipe import DistributedConfig

# Every value the Trainer knows from the recipe is "auto": transformers fills it in (and refuses a mismatch).
_FROM_RECIPE = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
PRESETS: dict[str, dict[str, Any]] = {
    "zero2": {**_FROM_RECIPE, "zero_optimization": {"stage": 2, "contiguous_gradients": True}},
    "zero3": {**_FROM_RECIPE, "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}},
    "zero3_offload": {**_FROM_RECIPE, "zero_optimization": {
        "stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
        "offload_param": {"device": "cpu", "pin_memory": True},
        "offload_optimizer": {"device": "cpu", "pin_memory": True}}},
}
# Keys of a user's config that the recipe decides: a number there could disagree with train.batch_size & co.
RECIPE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_config(option: str) -> dict[str, Any]:
    """The DeepSpeed config a preset name or a JSON file stands for, checked: ZeRO stage 2 or 3, batch sizes and
    precision left to the recipe, and at stage 3 the full weights gathered at save (the run folder's model is one
    safetensors model that plain transformers loads)."""
    if option in PRESETS:
        return json.loads(json.dumps(PRESETS[option]))  # a copy: transformers fills in the "auto" values
    path = Path(option).expanduser()
    if not path.is_file():
        raise TunelabError(f"train.distributed.deepspeed '{option}' is neither a preset ({', '.join(PRESETS)}) nor "
                           f"an existing JSON file; name a preset or the path of a DeepSpeed config")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TunelabError(f"DeepSpeed config '{path}' is not valid JSON ({exc.msg}, line {exc.lineno}); fix the "
                           f"file or use a preset ({', '.join(PRESETS)})") from None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (2, 3):
        raise TunelabError(f"DeepSpeed config '{path}' has zero_optimization.stage {stage}; tunelab runs ZeRO "
                           f"stage 2 or 3 (set \"zero_optimization\": {{\"stage\": 2}} or 3)")
    fixed = [key for key in RECIPE_KEYS if config.get(key, "auto") != "auto"]
    fixed += [f"{kind}.enabled" for kind in ("bf16", "fp16") if config.get(kind, {}).get("enabled", "auto") not in
              ("auto", False)]
    if fixed:
        raise TunelabError(f"DeepSpeed config '{path}' sets {', '.join(fixed)}; the recipe decides these "
                           f"(train.batch_size, train.grad_accum, train.precision): write \"auto\" there")
    if stage == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise TunelabError(f"DeepSpeed config '{path}' sets stage3_gather_16bit_weights_on_model_save false; "
                               f"tunelab saves the trained model whole (set it to true)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def weights_are_sharded(model=None) -> bool:
    """Whether this process holds only a shard of the weights (ZeRO-3, FSDP): every forward pass is then a
    collective, so all processes must run the same passes (no per-rank blocks of rows to score). Read from the
    libraries' own marks: transformers notes a ZeRO-3 config, and marks a model it sharded with FSDP2."""
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() or (model is not None and is_fsdp_managed_module(model))


def fsdp_loading(distributed: DistributedConfig) -> dict[str, Any]:
    """from_pretrained's options that shard a model over this run's processes as it loads (strategy fsdp on
    several processes: full sharding over all of them, or hybrid: sharded within each machine, replicated across
    machines); none otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed.strategy != "fsdp" or world_size < 2:
        return {}
    from transformers.distributed.configuration_utils import DistributedConfig as Layout

    if distributed.sharding == "hybrid":
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        return {"distributed_config": Layout(fsdp_size=per_machine, dp_replicate_size=world_size // per_machine)}
    return {"distributed_config": Layout(fsdp_size=world_size)}


def check_strategy(distributed: DistributedConfig, world_size: int, nnodes: int, cuda: bool,
                   launched: bool = False) -> None:
    """Refuse, in one line, a strategy that cannot run as asked here (`launched`: under torch's launcher)."""
    if distributed.strategy == "fsdp" and distributed.sharding == "hybrid" and nnodes < 2:
        raise TunelabError("train.distributed.sharding hybrid shards within each machine and replicates across "
                           "machines, and this run has one machine; use sharding: full")
    if distributed.strategy == "deepspeed":
        config = deepspeed_config(distributed.deepspeed)
        zero = config["zero_optimization"]
        if not cuda and ("offload_param" in zero or "offload_optimizer" in zero):
            raise TunelabError("DeepSpeed offload moves state from GPU memory to CPU memory, and this run trains on "
                               "CPU; use train.distributed.deepspeed zero3 (or zero2)")
        if importlib.util.find_spec("deepspeed") is None:  # not imported here: it announces its accelerator
            raise TunelabError("train.distributed.strategy deepspeed needs the deepspeed package; install it with "
                               "`pip install --no-build-isolation deepspeed` (or use strategy ddp)")
    # One GPU may still want ZeRO for its offload; DeepSpeed needs the launcher's environment even then.
    offloads_on_one_gpu = distributed.strategy == "deepspeed" and cuda and launched
    if distributed.strategy != "ddp" and world_size < 2 and not offloads_on_one_gpu:
        raise TunelabError(f"train.distributed.strategy {distributed.strategy} shards the model over several "
                           f"processes, and this run has one; add --nproc N (N ≥ 2; deepspeed on one GPU: --nproc 1 "
                           f"runs it under the launcher) or use the default ddp")


def training_options(distributed: DistributedConfig) -> dict[str, Any]:
    """The TrainingArguments options that select the strategy: DeepSpeed's config; none for ddp (the Trainer's
    default); for fsdp (the model comes sharded: see fsdp_loading) checkpoints of the model alone."""
    if distributed.strategy == "deepspeed":
        return {"deepspeed": deepspeed_config(distributed.deepspeed)}
    if distributed.strategy == "fsdp":  # transformers keeps no optimizer state of a model sharded at load
        return {"save_only_model": True}
    return {}


def strategy_name(trainer) -> str:
    """What metrics.json records: 'single' on one process, else ddp, fsdp or deepspeed zeroN."""
    if trainer.args.world_size < 2:
        return "single"
    if trainer.is_deepspeed_enabled:
        return f"deepspeed zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    return "fsdp" if weights_are_sharded(trainer.model) else "ddp"


def name_deepspeed_accelerator() -> None:
    """Tell DeepSpeed (if installed) its accelerator before anything imports it: accelerate's model unwrapping
    imports it in every run, and left to detect one on a machine without CUDA it warns on the console each time."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def join_deepspeed() -> None:
    """Start DeepSpeed's communication layer over torch's process group (what accelerate would do later), with
    its chatter kept off the console: on CPU it names the accelerator it chose and announces the shared-memory
    kernel it builds, on every start."""
    import contextlib
    import io

    import torch

    name_deepspeed_accelerator()
    with contextlib.redirect_stdout(io.StringIO()):
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
