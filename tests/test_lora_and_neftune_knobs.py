"""Four knobs from LLaMA-Factory, each one line of peft/transformers configuration: rsLoRA's scaling, PiSSA/OLoRA
adapters saved as plain LoRA for the original base, LoRA+'s learning rates for B, NEFTune's embedding noise."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType
from peft.tuners.lora import Linear as LoraLinear
from test_generative_tiny import generative_recipe
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
from trl import SFTConfig

from tunelab import api
from tunelab.methods.apply import apply_method, load_trainable_decoder
from tunelab.models.loading import load_causal_lm, load_tokenizer
from tunelab.recipe import LoraMethod, validate_recipe
from tunelab.stages.sft import TunelabSFTTrainer, sft_options
from tunelab.trainer import TunelabTrainer, training_arguments


def lora_layers(model) -> list[LoraLinear]:
    return [module for module in model.modules() if isinstance(module, LoraLinear)]


def adapted_decoder(tiny_llama, bf16: bool = False, **options):
    return apply_method(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraMethod(name="lora", **options), [],
                        TaskType.CAUSAL_LM, bf16)


@pytest.mark.parametrize(("use_rslora", "scaling"), [(True, 8 / 4), (False, 8 / 16)])  # alpha 8, r 16, √r 4
def test_rslora_scales_adapters_by_alpha_over_the_root_of_r(tiny_llama, use_rslora, scaling):
    layers = lora_layers(adapted_decoder(tiny_llama, r=16, alpha=8, use_rslora=use_rslora))
    assert layers and {layer.scaling["default"] for layer in layers} == {scaling}


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_run_saves_a_plain_lora_adapter_for_the_original_base(tiny_llama, qa_data, tmp_path,
                                                                              monkeypatch, init):
    """PiSSA/OLoRA train on a base with part of each weight moved into the adapter; the run folder's adapter must
    give the trained model on the original base, applied as it is (no loader re-running the move)."""
    trained = []

    def keep(*args):
        trained.append(load_trainable_decoder(*args))
        return trained[-1]

    monkeypatch.setattr("tunelab.stages.sft.load_trainable_decoder", keep)
    recipe = generative_recipe(tiny_llama, qa_data, method={"name": "lora", "r": 4, "init_lora_weights": init},
                               train={"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32"},
                               eval={"generate": {"max_new_tokens": 1, "num_samples": 2}})
    run_dir, _ = api.train(validate_recipe(recipe), str(tmp_path / init))
    saved = run_dir / "model"
    config = json.loads((saved / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["r"], config["lora_alpha"]) == (True, 8, 16)  # ΔW = [B | -B₀][A; A₀]
    ids = torch.tensor([[5, 9, 11, 7, 6, 14]])
    want = logits_of(trained[0], ids)
    # tunelab's own loading (generate, export, a chained run): the adapter merged into the original base
    assert torch.allclose(logits_of(load_causal_lm(str(saved)), ids), want, atol=1e-5)

    def applied_as_is(folder) -> torch.Tensor:
        """What a loader that never re-runs PiSSA/OLoRA (vLLM, llama.cpp) makes of an adapter on the original base."""
        plain = LoraConfig.from_pretrained(str(folder))
        plain.init_lora_weights = True
        return logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(folder),
                                                   config=plain), ids)

    assert torch.allclose(applied_as_is(saved), want, atol=1e-5)
    trained[0].save_pretrained(str(tmp_path / "naive"))  # without the conversion: the move is lost on that base
    assert (applied_as_is(tmp_path / "naive") - want).abs().max() > 0.1


def test_pissa_moves_the_fp32_weights_before_a_bf16_base_is_stored(tiny_llama):
    """The SVD runs on the fp32 weights and the residual is stored in bf16 after it (not an SVD of bf16 weights)."""
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[0].self_attn.q_proj.weight
    layer = lora_layers(adapted_decoder(tiny_llama, bf16=True, r=4, init_lora_weights="pissa"))[0]
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert (lora_a.dtype, lora_b.dtype, layer.base_layer.weight.dtype) == (torch.float32, torch.float32,
                                                                            torch.bfloat16)
    residual = original - layer.scaling["default"] * lora_b @ lora_a
    assert torch.equal(layer.base_layer.weight, residual.to(torch.bfloat16))


def token_rows(count: int = 4) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"input_ids": [4 + i, 5, 6, 7, 8], "labels": [4 + i, 5, 6, 7, 8]}
                                       for i in range(count)])


def one_step_trainer(model, tmp_path, **options) -> TunelabTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-3, lr_scheduler_type="constant",
                             weight_decay=0.0, per_device_train_batch_size=4, report_to="none", use_cpu=True,
                             save_strategy="no")
    return TunelabTrainer(model=model, args=args, train_dataset=token_rows(), **options)


def group_rates(trainer, model) -> dict[str, set[float]]:
    """The learning rates the optimizer gives the lora_A and the lora_B weights."""
    rate = {id(param): group["lr"] for group in trainer.optimizer.param_groups for param in group["params"]}
    return {kind: {rate[id(param)] for name, param in model.named_parameters() if f"{kind}." in name}
            for kind in ("lora_A", "lora_B")}


@pytest.mark.parametrize(("ratio", "expected"), [(16.0, 16.0), (None, 1.0)])
def test_loraplus_trains_b_at_the_ratio_times_the_learning_rate(tiny_llama, tmp_path, ratio, expected):
    model = adapted_decoder(tiny_llama, r=4, loraplus_lr_ratio=ratio)
    with torch.no_grad():  # B starts at zero, which leaves A no gradient in the first step
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    trainer = one_step_trainer(model, tmp_path)
    trainer.train()
    assert group_rates(trainer, model) == {"lora_A": {1e-3}, "lora_B": {1e-3 * expected}}
    # Adam's first step moves each weight by about its learning rate
    moved = {kind: max((param - before[name]).abs().max().item() for name, param in model.named_parameters()
                       if f"{kind}." in name) for kind in ("lora_A", "lora_B")}
    assert moved["lora_B"] / moved["lora_A"] == pytest.approx(expected, rel=0.02)


def test_loraplus_keeps_an_optimizer_the_stage_passed_in(tiny_llama, tmp_path):
    model = adapted_decoder(tiny_llama, r=4, loraplus_lr_ratio=16.0)
    given = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.5)
    assert one_step_trainer(model, tmp_path, optimizers=(given, None)).create_optimizer() is given


class EmbeddingNoise(TrainerCallback):
    """Runs the model's token embeddings twice in train mode and twice in eval mode, within a training step."""

    def __init__(self, model, ids: torch.Tensor) -> None:
        self.embeddings, self.ids, self.seen = model.get_input_embeddings(), ids, {}

    def outputs(self) -> dict[str, torch.Tensor]:
        """Two train-mode and two eval-mode outputs for the ids; the module's mode is left as it was."""
        was_training, out = self.embeddings.training, {}
        with torch.no_grad():
            for mode in ("train", "eval"):
                self.embeddings.train(mode == "train")
                out[mode] = torch.stack([self.embeddings(self.ids), self.embeddings(self.ids)])
        self.embeddings.train(was_training)
        return out

    def on_step_end(self, args, state, control, **kwargs):
        """Look at the embeddings while the Trainer's NEFTune hook is on."""
        self.seen = self.outputs()


def test_neftune_adds_noise_to_the_embeddings_of_sft_training_steps_only(tiny_llama, qa_data, tmp_path):
    recipe = validate_recipe(generative_recipe(tiny_llama, qa_data, train={"max_steps": 1, "neftune_noise_alpha": 5}))
    assert recipe.train.padding_free is False  # transformers scales the noise by a batch row's length
    args = training_arguments(recipe.train, recipe.eval, tmp_path, bf16=False, args_class=SFTConfig,
                              **sft_options(recipe))
    assert isinstance(args, SFTConfig) and args.neftune_noise_alpha == 5 and args.padding_free is False
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[5, 9, 11, 7, 6, 14]])
    clean = model.get_input_embeddings()(ids).detach()
    rows = datasets.Dataset.from_list([{"input_ids": [4, 5, 6, 7, 8], "completion_mask": [0, 0, 1, 1, 1]}] * 8)
    watch = EmbeddingNoise(model, ids)
    trainer = TunelabSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=load_tokenizer(
        str(tiny_llama)), callbacks=[watch])
    trainer.train()
    noisy, quiet = watch.seen["train"], watch.seen["eval"]
    bound = 5 / (ids.shape[1] * clean.shape[-1]) ** 0.5  # NEFTune: uniform in ±alpha/√(length × width)
    assert not torch.equal(noisy[0], noisy[1]) and 0 < (noisy - clean).abs().max() <= bound
    assert torch.equal(quiet[0], clean) and torch.equal(quiet[1], clean)
    assert torch.equal(watch.outputs()["train"][0], clean)  # the hook is gone after training
