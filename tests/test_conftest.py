"""The tiny random models every fast test trains are the same in every pytest process."""

from __future__ import annotations

import torch
from conftest import seeded_random_weights
from safetensors.torch import load_file
from transformers import BertConfig, BertModel


def test_tiny_bert_weights_do_not_depend_on_earlier_random_draws(tiny_bert):
    torch.rand(1000)  # what earlier tests may draw
    expected = seeded_random_weights(BertModel, BertConfig.from_pretrained(tiny_bert)).state_dict()
    saved = load_file(str(tiny_bert / "model.safetensors"))
    assert saved.keys() <= expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in saved.items())
