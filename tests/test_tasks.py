"""The task registry: every command works for every task that claims it, on tiny runs, and refuses the others with
the registry's line. DPO, KTO, GRPO and seq2seq runs generate, chat and serve; a reward run scores through
`tunelab predict` and serve's /v1/score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import test_serve
from conftest import toy_recipe, write_jsonl
from test_generative_tiny import generative_recipe
from test_preference_tiny import completion_rows, preference_recipe, write_pairs
from test_serve import CHAT_TEMPLATE, client, free_port, greedy, wait_until_healthy

import tunelab
from tunelab import api
from tunelab.cli import main
from tunelab.evaluation.judge import load_reward
from tunelab.inference.generator import load_generator
from tunelab.recipe import GenerateConfig, RewardSource, validate_recipe
from tunelab.tasks import TASKS, refusal, tasks_that

ONE_STEP = {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-3, "precision": "fp32"}
NO_SAMPLES = {"generate": {"max_new_tokens": 2, "num_samples": 0}}
chat_llama = test_serve.chat_llama  # the tiny llama with a chat template in its tokenizer, as an instruct model has


@pytest.fixture(scope="module")
def runs(chat_llama, tiny_bert, qa_data, toy_data, tmp_path_factory) -> dict[str, Path]:
    """One finished one-step run of each task but fewshot and pretrain (which share sft's and classify's paths)."""
    folder = tmp_path_factory.mktemp("task-runs")
    pairs = write_pairs(folder / "pairs", train=16, test=8)
    prompts = folder / "prompts"
    prompts.mkdir()
    write_jsonl(prompts / "train.jsonl", completion_rows(8, seed=3))
    write_jsonl(prompts / "test.jsonl", completion_rows(4, seed=4))
    lora = {"name": "lora", "r": 4}
    recipes = {
        "classify": toy_recipe(tiny_bert, toy_data, train=ONE_STEP),
        "sft": generative_recipe(chat_llama, qa_data, method=lora, train=ONE_STEP, eval=NO_SAMPLES),
        "seq2seq": generative_recipe(tiny_bert, qa_data, task="seq2seq", train=ONE_STEP, eval=NO_SAMPLES,
                                     data={"source": str(qa_data), "prompt_template": "{sentence}",
                                           "response_template": "{answer}"}),
        "reward": preference_recipe(tiny_bert, pairs, train=ONE_STEP),
        "dpo": preference_recipe(chat_llama, pairs, task="dpo", method=lora, train=ONE_STEP, eval=NO_SAMPLES),
        "kto": preference_recipe(chat_llama, pairs, task="kto", method=lora, train=ONE_STEP, eval=NO_SAMPLES),
        "grpo": preference_recipe(chat_llama, prompts, task="grpo", method=lora, train=ONE_STEP, eval=NO_SAMPLES,
                                  data={"source": str(prompts), "format": "prompt_completion"},
                                  reward={"function": "exact_match"}, grpo={"num_generations": 2,
                                                                             "max_new_tokens": 2}),
    }
    return {task: api.train(validate_recipe(recipe), str(folder / task))[0] for task, recipe in recipes.items()}


def answering(runs: dict[str, Path]) -> list[str]:
    return [task for task in runs if TASKS[task].answers]


def test_the_registry_claims_what_the_issue_asks_for():
    assert set(tasks_that("answers")) == {"sft", "pretrain", "seq2seq", "dpo", "kto", "grpo"}
    assert tasks_that("scores") == ("reward",) and set(tasks_that("labels")) == {"classify", "fewshot"}
    assert all(task.stage() for task in TASKS.values())  # every stage module and function exists


def test_every_answering_run_generates_and_chats_as_it_trained(runs):
    """generate puts the text into the run's prompt shape; chat goes through its (or its model's) chat template,
    except seq2seq, which has none and says so."""
    settings = GenerateConfig(max_new_tokens=3)
    for task in answering(runs):
        generator = load_generator(runs[task])
        answers = api.generate(str(runs[task]), ["good morning", "bad day"], max_new_tokens=3)
        assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers), task
        assert answers == generator.generate(["good morning", "bad day"], settings), task  # greedy: reproducible
        if TASKS[task].prompts == "encoder":
            with pytest.raises(tunelab.errors.TunelabError, match="no chat template"):
                list(generator.stream_chat([{"role": "user", "content": "hi"}], settings))
            continue
        assert generator.chat_template == CHAT_TEMPLATE, task
        messages = [{"role": "user", "content": "good morning"}]
        reply = "".join(generator.stream_chat(messages, settings))
        assert reply.strip() == templated_greedy(generator, messages, 3).strip(), task


def templated_greedy(generator, messages: list[dict], max_new_tokens: int) -> str:
    """The run's model answering the conversation rendered by CHAT_TEMPLATE, greedy, in plain transformers."""
    import torch

    tokenizer = generator.tokenizer
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = generator.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_commands_a_task_lacks_are_refused_with_the_registrys_line(runs, capsys):
    for task, run in runs.items():
        claims = TASKS[task]
        if not claims.answers:
            assert main(["generate", str(run), "hello"]) == 2
            line = capsys.readouterr().err.strip()
            assert line == f"error: {refusal(repr(str(run)), task, 'answers', 'answering prompts')}", line
        if not (claims.labels or claims.scores):
            assert main(["predict", str(run), "hello"]) == 2
            line = capsys.readouterr().err.strip()
            assert line.endswith(refusal(repr(str(run)), task, ("labels", "scores"), "`tunelab predict`")), line
            assert "this run works with `tunelab generate` / `tunelab chat`" in line


def test_a_reward_run_scores_through_predict_as_its_judge_does(runs, capsys):
    run = runs["reward"]
    texts = ["good morning great", "bad day awful", "a fine hello", "a terrible hello"]
    assert main(["predict", str(run), *texts]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    judge = load_reward(RewardSource(model=str(run)), 16, bf16=False)
    expected = judge(prompts=texts, completions=[""] * len(texts))
    assert [row["text"] for row in printed] == texts
    assert [row["score"] for row in printed] == pytest.approx(expected, abs=1e-5)
    assert len({round(row["score"], 4) for row in printed}) > 1  # a real score, not a constant


@pytest.fixture(scope="module")
def task_servers(runs, tmp_path_factory):
    """Real `tunelab serve` processes for a dpo, a seq2seq, a grpo and a reward run: the two decoders in float32
    (their answers are compared with fp32 chat's), the seq2seq run in `--dtype auto`'s choice for it (float32)."""
    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("TUNELAB_API_KEY", None)
    logs = tmp_path_factory.mktemp("task-server-logs")
    started = {}
    for task in ("dpo", "seq2seq", "grpo", "reward"):
        port = free_port()
        log = open(logs / f"{task}.log", "w")  # noqa: SIM115 - closed at teardown
        dtype = ["--dtype", "float32"] if task in ("dpo", "grpo") else []
        process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(runs[task]), "--port", str(port),
                                    *dtype], env=env, stdout=log, stderr=subprocess.STDOUT)
        started[task] = (process, f"http://127.0.0.1:{port}", log, logs / f"{task}.log")
    try:
        for process, url, _, log_path in started.values():
            wait_until_healthy(process, url, log_path, None)
        yield {task: url for task, (_, url, _, _) in started.items()}
    finally:
        for process, _, log, _ in started.values():
            process.terminate()
            process.wait(timeout=20)
            log.close()


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_serve_answers_a_preference_or_rl_run_as_chat_does(task, runs, task_servers):
    model = Path(runs[task]).name
    answer = client(task_servers[task]).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "good morning"}], max_tokens=3, temperature=0)
    settings = GenerateConfig(max_new_tokens=3)
    expected = "".join(load_generator(runs[task]).stream_chat([{"role": "user", "content": "good morning"}],
                                                              settings))
    assert answer.choices[0].message.content.strip() == expected.strip()
    text = client(task_servers[task]).completions.create(model=model, prompt="good morning", max_tokens=3,
                                                         temperature=0)
    assert isinstance(text.choices[0].text, str) and text.choices[0].finish_reason in ("stop", "length")


def test_serve_answers_a_seq2seq_run_as_generate_does(runs, task_servers):
    model = Path(runs["seq2seq"]).name
    assert httpx.get(f"{task_servers['seq2seq']}/health").json()["weights"] == "float32"  # auto: an encoder-decoder
    prompts = ["good morning", "a bad day"]
    expected = api.generate(str(runs["seq2seq"]), prompts, max_new_tokens=3)
    for prompt, want in zip(prompts, expected, strict=True):
        got = client(task_servers["seq2seq"]).completions.create(model=model, prompt=prompt, max_tokens=3,
                                                                 temperature=0)
        assert got.choices[0].text.strip() == want
    refused = httpx.post(f"{task_servers['seq2seq']}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert refused.status_code == 400 and "no chat template" in refused.json()["error"]["message"]


def test_serve_scores_with_a_reward_run_as_predict_does(runs, task_servers):
    url, model = task_servers["reward"], Path(runs["reward"]).name
    texts = ["good morning great", "bad day awful"]
    whole = httpx.post(f"{url}/v1/score", json={"model": model, "input": texts}, timeout=30)
    assert whole.status_code == 200, whole.text
    scores = [row["score"] for row in whole.json()["data"]]
    assert scores == pytest.approx([row["score"] for row in api.predict(str(runs["reward"]), texts)], abs=1e-5)
    pair = httpx.post(f"{url}/v1/score", json={"model": model, "prompt": ["good morning"], "response": [" great"]},
                      timeout=30).json()
    judge = load_reward(RewardSource(model=str(runs["reward"])), 16, bf16=False)
    assert pair["data"][0]["score"] == pytest.approx(judge(prompts=["good morning"], completions=[" great"])[0],
                                                     abs=1e-5)
    for body in ({"model": model}, {"model": model, "input": "x", "prompt": "y", "response": "z"},
                 {"model": model, "prompt": ["a", "b"], "response": ["c"]}):
        bad = httpx.post(f"{url}/v1/score", json=body, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["message"], body
    wrong = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": [
        {"role": "user", "content": "hi"}]}, timeout=30)
    assert wrong.status_code == 400 and "/v1/score" in wrong.json()["error"]["message"]


def test_the_playground_answers_with_a_dpo_run_and_its_base(runs, chat_llama):
    from tunelab.ui.playground import Playground

    playground = Playground()
    settings = GenerateConfig(max_new_tokens=3)
    tuned = "".join(playground.stream(Path(runs["dpo"]), "tuned", "good morning", settings))
    base = "".join(playground.stream(Path(runs["dpo"]), "base", "good morning", settings))
    assert tuned.strip() == api.generate(str(runs["dpo"]), ["good morning"], max_new_tokens=3)[0]
    assert base.strip() == greedy(chat_llama, "good morning", 3, chat=False).strip()  # dpo reads plain prompts
    with pytest.raises(tunelab.errors.TunelabError, match="labelling texts takes runs of tasks classify, fewshot"):
        playground.predict(Path(runs["dpo"]), "hello")


def test_every_task_has_a_recipe_class_and_a_stage_that_loads_checks_and_runs():
    """The registry names each task's stage module; it provides load_data, check_model and run (tunelab.api calls
    them), and recipe.py has the task's recipe class."""
    from tunelab.recipe import RECIPE_CLASSES

    for name, task in TASKS.items():
        stage = task.stage()
        assert all(callable(getattr(stage, function, None)) for function in ("load_data", "check_model", "run")), name
        assert RECIPE_CLASSES[name].model_fields["task"].annotation.__args__ == (name,)
