"""The speed-ups as one switchable, version-guarded package (tunelab.speedups): off gives the libraries' own paths,
a library version they were not checked against makes them fall back with one warning, and the library patches
last as long as the run."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import trl
import trl.kernels.chunked_logprob as kernel
import trl.trainer.utils as trl_utils

from tunelab import api
from tunelab.recipe import validate_recipe
from tunelab.speedups import SWITCH, guard, speedups_for_run
from tunelab.speedups.fast_dropout import FastDropout
from tunelab.speedups.packed_attention import PACKED_ATTENTION
from tunelab.stages import sft

TRL_PATCHED = [(kernel, "TOKEN_CHUNK_SIZE"), (kernel, "_addmm_fp32"), (kernel, "_forward_tile"),
               (kernel, "_backward_tile"), (trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"), (trl_utils, "_use_triton")]


def trls_own() -> list:
    """TRL's six fused-head attributes as they are now."""
    return [getattr(module, name) for module, name in TRL_PATCHED]


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU speed-ups: on CUDA most leave the model be")


def sft_recipe(model, data, **train) -> dict:
    """A LoRA SFT recipe on the toy questions: 2 steps, 8 eval rows scored by loss alone."""
    return {"name": "toy-sft", "task": "sft", "model": {"name": str(model), "max_length": 32},
            "data": {"source": str(data), "prompt_template": "{sentence} is", "response_template": " {answer}",
                     "eval_size": 8},
            "method": {"name": "lora", "r": 4, "dropout": 0.1},
            "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", **train},
            "eval": {"generate": {"num_samples": 0}}}


@pytest.fixture(autouse=True)
def nothing_warned_yet(monkeypatch):
    """Each test starts in a process that has reported no fallback yet (the guard reports once per process)."""
    monkeypatch.setattr(guard, "_warned", set())
    monkeypatch.delenv(SWITCH, raising=False)


def a_trainer() -> SimpleNamespace:
    """What Speedups.fit reads of a trainer: its model (here one dropout layer) and whether batches are padding-free."""
    return SimpleNamespace(model=torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1)))


@pytest.mark.parametrize("speedups", [True, False])
def test_train_speedups_false_trains_on_the_libraries_own_paths(tiny_llama, qa_data, tmp_path, monkeypatch,
                                                                 speedups):
    trl_before = trls_own()
    seen = {}

    class Recording(sft.TunelabSFTTrainer):
        def train(self, *args, **kwargs):
            seen["trl"], seen["trainer"] = trls_own(), self  # what TRL's fused head runs on while training
            return super().train(*args, **kwargs)

    monkeypatch.setattr(sft, "TunelabSFTTrainer", Recording)
    api.train(validate_recipe(sft_recipe(tiny_llama, qa_data, speedups=speedups)), str(tmp_path / "run"))
    model = seen["trainer"].model
    lora_layers = [module for name, module in model.named_modules() if name.endswith("q_proj")]
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    assert lora_layers and dropouts
    if speedups:  # the contrast: each speed-up did replace the library's path
        assert seen["trl"][2] is not trl_before[2] and seen["trl"][0] < trl_before[0]
        assert all("forward" in vars(layer) for layer in lora_layers)
        assert all(type(module) is FastDropout for module in dropouts)
        assert model.config._attn_implementation == PACKED_ATTENTION
    else:
        assert all(now is before for now, before in zip(seen["trl"], trl_before, strict=True))
        assert not any("forward" in vars(layer) for layer in lora_layers)  # peft's own lora.Linear.forward
        assert all(type(module) is torch.nn.Dropout for module in dropouts)
        assert model.config._attn_implementation == "sdpa"
        assert seen["trainer"].args.per_device_eval_batch_size == 4  # the block mask: a training batch at a time
    assert all(now is before for now, before in zip(trls_own(), trl_before, strict=True))  # given back after the run


def test_an_unchecked_trl_version_warns_once_and_keeps_trls_fused_head(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.99.0")
    trl_before = trls_own()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two runs in one process: one warning
            trainer = a_trainer()
            with speedups_for_run(True) as speedups:
                speedups.fit(trainer)
                assert all(now is before for now, before in zip(trls_own(), trl_before, strict=True))
            assert type(trainer.model[1]) is FastDropout  # the transformers-checked speed-ups still apply
    fallbacks = [str(warning.message) for warning in caught if warning.category is guard.SpeedupFallbackWarning]
    assert len(fallbacks) == 1 and "fused_head" in fallbacks[0] and "trl 1.99.0" in fallbacks[0]


def test_a_trl_internal_with_other_arguments_warns_and_keeps_trls_fused_head(monkeypatch):
    def forward_tile(tile, targets, **flags):  # a TRL whose private fold takes other arguments
        return None

    monkeypatch.setattr(kernel, "_forward_tile", forward_tile)
    with pytest.warns(guard.SpeedupFallbackWarning, match="_forward_tile"), speedups_for_run(True) as speedups:
        speedups.fit(a_trainer())
        assert kernel._forward_tile is forward_tile and kernel.TOKEN_CHUNK_SIZE == 4096


def test_library_patches_are_given_back_when_the_run_ends_even_by_an_error():
    trl_before = trls_own()
    with pytest.raises(RuntimeError, match="the stage failed"), speedups_for_run(True) as speedups:
        speedups.fit(a_trainer())
        assert kernel.TOKEN_CHUNK_SIZE == 512 and kernel._forward_tile is not trl_before[2]
        raise RuntimeError("the stage failed")
    assert all(now is before for now, before in zip(trls_own(), trl_before, strict=True))


@pytest.mark.parametrize(("value", "enabled"), [("0", False), ("off", False), ("false", False), ("1", True)])
def test_the_environment_switch_turns_them_off_whatever_the_recipe(monkeypatch, value, enabled):
    monkeypatch.setenv(SWITCH, value)
    trainer, trl_before = a_trainer(), trls_own()
    with speedups_for_run(True) as speedups:
        speedups.fit(trainer)
        assert speedups.enabled is enabled
        assert (trls_own() == trl_before) is not enabled
        assert (speedups.batch_order([3, 1, 2], 2) is None) is not enabled
    assert (type(trainer.model[1]) is FastDropout) is enabled


def test_checking_them_draws_nothing_from_the_runs_random_stream():
    """The guard's look at peft's layer must not shift dropout masks or the batch order of the run (a run with
    speed-ups trains the very steps it trained before they were guarded)."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for name in ("fused_head", "fused_lora", "packed_attention", "fast_dropout", "glibc_malloc", "batch_order"):
        assert guard.usable(name) is not None
    assert torch.equal(torch.rand(3), expected)


def test_recipes_switch_them_with_train_speedups(tiny_llama, qa_data):
    assert validate_recipe(sft_recipe(tiny_llama, qa_data)).train.speedups is True
    assert validate_recipe(sft_recipe(tiny_llama, qa_data, speedups=False)).train.speedups is False
