"""While training on a CPU (glibc), freed memory stays in the heap: after the first steps, a training step reuses
the pages of the one before instead of faulting fresh ones in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tunelab.speedups.glibc_malloc import glibc

pytestmark = pytest.mark.skipif(glibc() is None or torch.cuda.is_available(), reason="glibc CPU training only")

# In a fresh process, so that glibc's state does not depend on the tests before: minor page faults of each of 8
# full fine-tuning steps of a small BERT, first as glibc leaves the heap, then inside heap_kept_for_training.
STEPS = """
import json, resource, torch
from transformers import BertConfig, BertForSequenceClassification
from tunelab.speedups.glibc_malloc import heap_kept_for_training
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=512)).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids, labels = torch.randint(0, 30000, (16, 64)), torch.randint(0, 2, (16,))
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = [faults_of_a_step() for _ in range(8)]
with heap_kept_for_training():
    kept = [faults_of_a_step() for _ in range(8)]
print(json.dumps({"default": default, "kept": kept}))
"""


def test_training_steps_reuse_freed_pages_inside_the_block():
    faults = json.loads(subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True,
                                       check=True).stdout)
    # measured: 7,200-8,200 pages a step by default (30 MB trimmed and faulted in again), 0-640 kept
    assert min(faults["default"][2:]) > 2000
    assert sum(faults["kept"][2:]) < 2000
