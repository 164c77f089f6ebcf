"""A run killed mid-training resumes from its last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml
from conftest import toy_recipe


def test_killed_run_resumes_and_matches_an_uninterrupted_run(tiny_bert, toy_data, tmp_path):
    recipe = toy_recipe(tiny_bert, toy_data)
    # Checkpoints at epoch ends (90 rows / batch 8 = 12 steps an epoch): resumed mid-epoch (step 40), a run once
    # ended 2 of 45 eval rows away from the uninterrupted one; resumed at an epoch end it matches.
    recipe["train"].update(checkpoint_every=12, epochs=12)
    recipe_path = tmp_path / "toy.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    killed = tmp_path / "killed"

    process = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(recipe_path), "--output", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    # Any checkpoint from step 36 on: the trainer keeps only the newest few, so a given one may come and go
    # between two looks.
    while not any(int(c.name.split("-")[1]) >= 36 for c in (killed / "checkpoints").glob("checkpoint-*")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()

    # All three runs in fresh processes with the same environment: the test process may have changed torch's thread
    # count (other tests do), and another thread count sums floats in another order.
    for args in (["--output", str(killed), "--resume"], ["--output", str(tmp_path / "straight")]):
        finished = subprocess.run([sys.executable, "-m", "tunelab", "train", str(recipe_path), *args],
                                  capture_output=True, text=True, env=os.environ.copy())
        assert finished.returncode == 0, finished.stderr[-2000:]

    resumed = json.loads((killed / "metrics.json").read_text())
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert resumed["before"] == straight["before"]
    assert abs(resumed["after"]["accuracy"] - straight["after"]["accuracy"]) <= 0.01
    assert resumed["after"]["accuracy"] > resumed["before"]["accuracy"] + 0.3
    logged_steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert logged_steps.count(1) == 1, "the resumed attempt must continue from the checkpoint, not restart at step 1"
    assert max(logged_steps) == 12 * 12  # 90 rows / batch 8 = 12 steps per epoch


def test_resume_skips_a_checkpoint_cut_off_while_saving(tmp_path):
    from tunelab.trainer import last_checkpoint

    for step, complete in [(20, True), (40, True), (60, False)]:
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "checkpoint-40")
    assert last_checkpoint(tmp_path / "nothing") is None


def test_resume_accepts_a_recipe_saved_before_an_option_existed(tiny_bert, toy_data):
    from tunelab.recipe import validate_recipe
    from tunelab.runs.folder import same_recipe

    recipe = validate_recipe(toy_recipe(tiny_bert, toy_data))
    older = yaml.safe_load(recipe.to_yaml())
    del older["eval"]["select_best"], older["data"]["format"]  # options added later, saved runs lack them
    assert same_recipe(yaml.safe_dump(older, sort_keys=False), recipe)
    older["train"]["epochs"] = 99
    assert not same_recipe(yaml.safe_dump(older, sort_keys=False), recipe)
    assert not same_recipe("task: [", recipe)
