"""Retention probes: scores equal a one-item-at-a-time reference, windows cover each token once, comparisons flag
real changes only, and the shipped probes load as lm-evaluation-harness reads them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.errors import TunelabError
from tunelab.evaluation import retention
from tunelab.evaluation.retention import ChoiceItem, Document

GOALS = ["the day was", "a chair is", "this paper", "it was very", "the window"]
CHOICES = [("good", "bad window"), ("a lovely happy table", "sad"), ("great", "poor ugly door is"),
           ("fine day", "awful"), ("the door was happy", "it")]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def toy_items() -> list[ChoiceItem]:
    return [ChoiceItem(retention.CHOICE_PROMPT.format(goal=goal), choices, row % 2, row)
            for row, (goal, choices) in enumerate(zip(GOALS, CHOICES, strict=True))]


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One sequence, no padding, no batching: the log-probability of the continuation's tokens."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))


def test_batched_choice_scores_equal_a_one_item_at_a_time_reference(llama):
    model, tokenizer = llama
    items = toy_items()
    expected = [[reference_loglikelihood(model, tokenizer, item.context, " " + choice) for choice in item.choices]
                for item in items]
    for batch_size in (1, 3, 16):  # 3 mixes lengths in a batch, so rows are padded
        scored = retention.score_multiple_choice(model, tokenizer, items, batch_size=batch_size)
        np.testing.assert_allclose(scored["loglikelihoods"], expected, atol=1e-4)
    right = [int(np.argmax(lls) == item.label) for lls, item in zip(expected, items, strict=True)]
    assert scored["per_row"]["acc"] == right
    assert scored["acc"] == pytest.approx(np.mean(right))


def test_a_text_longer_than_the_context_keeps_its_last_tokens_as_the_harness_does(llama):
    model, tokenizer = llama  # the tiny Llama has 64 positions
    item = ChoiceItem(retention.CHOICE_PROMPT.format(goal=" ".join(["the good day"] * 30)), ("was lovely", "bad"), 0, 0)
    whole = tokenizer(item.context + " was lovely")["input_ids"]
    start = len(tokenizer(item.context)["input_ids"])
    kept = whole[-65:]  # the harness: (context + continuation)[-(max_length + 1):], the last one only predicted
    with torch.no_grad():
        logprobs = model(torch.tensor([kept[:-1]])).logits[0].log_softmax(-1)
    expected = sum(float(logprobs[i - 1, kept[i]]) for i in range(len(kept) - (len(whole) - start), len(kept)))
    scored = retention.score_multiple_choice(model, tokenizer, [item])["loglikelihoods"][0][0]
    assert len(whole) > 65 and scored == pytest.approx(expected, abs=1e-4)


def test_scores_ignore_the_tokenizers_padding_side_and_the_models_training_mode(llama):
    model, tokenizer = llama
    items = toy_items()
    baseline = retention.score_multiple_choice(model, tokenizer, items, batch_size=4)["loglikelihoods"]
    tokenizer.padding_side = "left"
    model.train()  # dropout would make two scorings differ if scoring did not switch it off
    try:
        again = retention.score_multiple_choice(model, tokenizer, items, batch_size=4)["loglikelihoods"]
        assert model.training, "scoring must give the model back in the mode it found it"
    finally:
        tokenizer.padding_side = "right"
        model.eval()
    np.testing.assert_allclose(again, baseline, atol=1e-5)


def test_acc_norm_divides_by_the_choices_characters_as_the_harness_does(llama, monkeypatch):
    model, tokenizer = llama
    # "ééééé" is 5 characters but 10 bytes: per character −5/5 = −1.0 loses to −6/8 = −0.75, per byte it would win
    item = ChoiceItem("Question: q\nAnswer:", ("ééééé", "abcdefgh"), 1, 0)
    monkeypatch.setattr(retention, "continuation_loglikelihoods", lambda *args: [-5.0, -6.0])
    scored = retention.score_multiple_choice(model, tokenizer, [item])
    assert scored["per_row"] == {"acc": [0], "acc_norm": [1]}  # acc takes the larger sum, −5


def test_rolling_windows_match_the_harness_and_cover_every_token_once():
    tokens = list(range(10, 20))
    # lm-evaluation-harness's get_rolling_token_windows + make_disjoint_window for max_seq_len 4, context_len 1
    assert retention.rolling_windows(tokens, 99, 4, 4) == [([99], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]),
                                                           ([15, 16, 17], [18, 19])]
    for length in (1, 5, 9, 10, 23):
        for max_length, stride in ((4, 4), (4, 1), (6, 3), (30, 30)):
            windows = retention.rolling_windows(tokens[:length] * 3, 99, max_length, stride)
            assert [t for _, continuation in windows for t in continuation] == (tokens[:length] * 3)
            text = [99, *tokens[:length] * 3]
            covered = 0
            for context, continuation in windows:
                assert len(context) + len(continuation) - 1 <= max_length
                assert context[-1] == text[covered], "the token before a window's first target must be its context"
                assert context == text[covered + 1 - len(context):covered + 1]
                covered += len(continuation)


def test_rolling_perplexity_equals_the_models_loss_and_does_not_depend_on_batching(llama):
    model, tokenizer = llama
    words = ["the", "day", "was", "good", "and", "this", "chair", "is", "very", "lovely", "it", "was", "a"]
    docs = [Document(" ".join(words[:n]), n, len(" ".join(words[:n]))) for n in (3, 9, 13)]
    one_window = retention.score_rolling_perplexity(model, tokenizer, docs, max_length=64)
    for doc, ll in zip(docs, one_window["per_row"]["loglikelihood"], strict=True):
        ids = [tokenizer.eos_token_id, *tokenizer(doc.text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
        assert ll == pytest.approx(-float(loss) * (len(ids) - 1), rel=1e-5)
    total = sum(one_window["per_row"]["loglikelihood"])
    assert one_window["word_perplexity"] == pytest.approx(math.exp(-total / sum(d.words for d in docs)))
    assert one_window["bits_per_byte"] == pytest.approx(-total / sum(d.bytes for d in docs) / math.log(2))
    windowed = [retention.score_rolling_perplexity(model, tokenizer, docs, max_length=4, stride=stride,
                                                   batch_size=batch)["per_row"]["loglikelihood"]
                for stride, batch in ((4, 1), (4, 5), (2, 3))]
    np.testing.assert_allclose(windowed[0], windowed[1], atol=1e-4)  # batched == unbatched
    assert windowed[0] != pytest.approx(one_window["per_row"]["loglikelihood"])  # short windows do lose context
    assert windowed[2] != pytest.approx(windowed[0])  # a shorter stride gives each window more context


def test_a_lora_wrapped_model_scores_as_its_merged_weights(llama):
    model, tokenizer = llama
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32)
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    items = toy_items()
    adapted = retention.score_multiple_choice(wrapped, tokenizer, items, batch_size=4)["loglikelihoods"]
    plain = retention.score_multiple_choice(model, tokenizer, items, batch_size=4)["loglikelihoods"]
    merged = wrapped.merge_and_unload()
    np.testing.assert_allclose(adapted, retention.score_multiple_choice(merged, tokenizer, items, 4)["loglikelihoods"],
                               atol=1e-4)
    assert not np.allclose(adapted, plain, atol=1e-3), "the adapter must change the scores"


def test_a_prompt_tuned_model_scores_its_inputs_not_its_virtual_tokens(llama):
    model, tokenizer = llama
    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32)
    wrapped = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    item = toy_items()[1]
    whole = tokenizer(item.context + " " + item.choices[0])["input_ids"]
    start = len(tokenizer(item.context)["input_ids"])
    with torch.no_grad():  # peft puts the 3 virtual tokens' logits first: the inputs' logits are the last ones
        logprobs = wrapped(input_ids=torch.tensor([whole])).logits[0, 3:].log_softmax(-1)
    expected = sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))
    scored = retention.score_multiple_choice(wrapped, tokenizer, toy_items(), batch_size=4)["loglikelihoods"]
    assert scored[1][0] == pytest.approx(expected, abs=1e-4)


def test_compare_flags_a_real_drop_and_not_a_null_one():
    rng = np.random.default_rng(0)
    before = (rng.random(500) < 0.7).astype(int)
    dropped = before.copy()
    dropped[np.flatnonzero(before)[:60]] = 0  # 60 of 500 items lost: −0.12
    ll = -rng.uniform(50, 500, 40)
    words = rng.integers(20, 200, 40)
    perplexity_rows = {"loglikelihood": ll.tolist(), "words": words.tolist(), "bytes": (words * 5).tolist()}
    worse_rows = {**perplexity_rows, "loglikelihood": (ll - 0.2 * words).tolist()}  # word ppl × e^0.2

    def scores(right, rows):
        return {"piqa": {"per_row": {"acc": right.tolist(), "acc_norm": right.tolist()}},
                "wikitext": {"per_row": rows}}

    null = retention.compare(scores(before, perplexity_rows), scores(before, perplexity_rows))
    assert null["piqa"]["acc"]["change"] == 0 and not null["piqa"]["acc"]["significant"]
    assert null["piqa"]["acc"]["p_value"] == 1.0
    assert null["wikitext"]["word_perplexity"]["ratio"] == pytest.approx(1.0)
    assert not null["wikitext"]["word_perplexity"]["significant"]

    real = retention.compare(scores(before, perplexity_rows), scores(dropped, worse_rows))
    acc = real["piqa"]["acc"]
    assert acc["change"] == pytest.approx(-0.12) and acc["significant"] and acc["high"] < 0 and acc["p_value"] < 1e-6
    ppl = real["wikitext"]["word_perplexity"]
    assert ppl["ratio"] == pytest.approx(math.exp(0.2)) and ppl["significant"] and ppl["low"] > 1
    assert ppl["after"] == pytest.approx(ppl["before"] * math.exp(0.2))

    line = retention.summarize(real)
    assert line.startswith("retained: PIQA acc 0.")
    assert "(−0.120 [" in line and "WikiText word ppl" in line and "(+22% [" in line
    assert "no significant change" in retention.summarize(null)


def test_compare_refuses_scores_of_different_items():
    with pytest.raises(TunelabError, match="same probe items"):
        retention.compare({"piqa": {"per_row": {"acc": [1, 0], "acc_norm": [1, 0]}}},
                          {"piqa": {"per_row": {"acc": [1], "acc_norm": [1]}}})


def test_shipped_piqa_loads_all_rows_and_samples_reproducibly():
    items = retention.load_piqa()
    assert len(items) == 1838 and {item.label for item in items} == {0, 1}
    assert items[0].context.startswith("Question: How do I ready a guinea pig cage") and items[0].context.endswith(
        "\nAnswer:")
    subset = retention.load_piqa(size=200)
    assert [item.row for item in subset] == sorted(item.row for item in subset) and len(subset) == 200
    assert subset == retention.load_piqa(size=200)
    assert subset != retention.load_piqa(size=200, seed=1)


def test_shipped_wikitext_cuts_the_harness_articles_and_counts_words_before_detokenizing():
    docs = retention.load_wikitext()
    assert len(docs) == 62  # the harness's wikitext test split has 62 documents
    first = docs[0]
    assert first.text.startswith(" = Robert <unk> =\n\nRobert") and " @-@ " not in first.text
    assert "guest-starring role" in first.text  # " @-@ " joined
    assert first.words > len(first.text.split())  # counted on the text before detokenizing


def test_detokenizer_matches_the_harnesses():
    sample = ' = = Career = = \n The " big " ( very ) cat @-@ like 1 @,@ 000 dogs \' s toy , they said . N \n'
    expected = ' == Career ==\nThe "big" (very) cat-like 1,000 dogs\' s toy, they said. N\n'
    assert retention.wikitext_detokenize(sample) == expected
    harness = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")  # only where lm_eval is installed
    text = "\n".join(retention.wikitext_pages(retention.find_probe(retention.WIKITEXT_FILE).read_text())[:5])
    assert retention.wikitext_detokenize(text) == harness.wikitext_detokenizer({"page": text})


def test_user_probes_load_and_bad_rows_name_the_fix(tmp_path):
    good = tmp_path / "mc.jsonl"
    good.write_text(json.dumps({"goal": "sky colour", "choices": ["blue", "green", "red"], "label": 0}) + "\n")
    assert retention.load_multiple_choice(good)[0].choices == ("blue", "green", "red")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"goal": "x", "choices": ["a", "b"], "label": 2}) + "\n")
    with pytest.raises(TunelabError, match="row 1"):
        retention.load_multiple_choice(bad)
    text = tmp_path / "notes.txt"
    text.write_text("First paragraph here.\n\nSecond one,\nover two lines.\n")
    docs = retention.load_text(text)
    assert [doc.words for doc in docs] == [3, 5] and docs[1].text == "Second one,\nover two lines."


# ---------------------------------------------------------------------------------------------------- in a run

PATTERN = "the chair was very lovely and the door was very happy"  # the replay text: learnable, unlike the qa rows


def write_probes(folder) -> tuple[str, str]:
    """A multiple-choice probe and a text probe (six documents of PATTERN) in the tiny tokenizer's words."""
    choice = folder / "toy_choice.jsonl"
    choice.write_text("".join(json.dumps({"goal": goal, "choices": list(choices), "label": row % 2}) + "\n"
                              for row, (goal, choices) in enumerate(zip(GOALS, CHOICES, strict=True))))
    text = folder / "toy_text.txt"
    text.write_text("\n\n".join(" ".join([PATTERN] * (2 + row)) for row in range(6)) + "\n")
    return str(choice), str(text)


def retention_run(tiny_llama, qa_data, folder, name: str, task: str = "sft", replay: dict | None = None):
    from test_generative_tiny import generative_recipe

    from tunelab import api
    from tunelab.recipe import validate_recipe

    choice, text = write_probes(folder)
    recipe = generative_recipe(tiny_llama, qa_data, task=task)
    recipe["train"]["epochs"] = 4
    recipe["eval"]["retention"] = {"enabled": True, "probes": [choice, text], "max_length": 32, "batch_size": 4}
    if replay is not None:
        recipe["data"]["replay"] = replay
    return api.train(validate_recipe(recipe), str(folder / name))


@pytest.fixture(scope="module")
def replay_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replay")
    (folder / "train.jsonl").write_text("".join(json.dumps({"line": PATTERN}) + "\n" for _ in range(5)))
    return folder


@pytest.fixture(scope="module")
def sft_runs(tiny_llama, qa_data, replay_source, tmp_path_factory):
    """One sft run scored by the two toy probes, and the same run with the probe's kind of text replayed."""
    folder = tmp_path_factory.mktemp("retention-runs")
    plain = retention_run(tiny_llama, qa_data, folder, "plain")
    replayed = retention_run(tiny_llama, qa_data, folder, "replayed",
                             replay={"source": str(replay_source), "template": "{line}", "fraction": 0.5})
    return plain, replayed


def test_a_run_scores_its_probes_before_and_after_into_metrics_and_the_console(sft_runs, capsys):
    (run_dir, metrics), _ = sft_runs
    block = metrics["retention"]
    assert list(block["before"]) == list(block["after"]) == list(block["change"]) == ["toy_choice", "toy_text"]
    assert block["before"]["toy_choice"]["items"] == 5 and "per_row" not in block["before"]["toy_choice"]
    assert set(block["change"]["toy_choice"]) == {"acc", "acc_norm"}
    assert block["change"]["toy_text"]["word_perplexity"]["before"] == pytest.approx(
        block["before"]["toy_text"]["word_perplexity"])
    assert block["summary"].startswith("retained: toy_choice acc ") and block["seconds"] >= 0
    assert "retention" not in metrics["before"] and "retention" not in metrics["after"]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["retention"]["summary"] == block["summary"]
    assert "retention" in json.loads((run_dir / "baseline.json").read_text())  # a resumed run reuses it


def test_replay_is_a_lever_the_probes_see(sft_runs):
    """Training on the qa rows leaves the text probe's perplexity where it was; replaying that kind of text into
    the same training lowers it, significantly."""
    (_, plain), (_, replayed) = sft_runs
    assert plain["replay_rows"] == 0 and replayed["replay_rows"] == 45  # 0.5 × 90 train rows
    without = plain["retention"]["change"]["toy_text"]["word_perplexity"]
    with_replay = replayed["retention"]["change"]["toy_text"]["word_perplexity"]
    assert with_replay["significant"] and with_replay["high"] < 1
    assert with_replay["ratio"] < without["ratio"] / 2
    assert replayed["after"]["exact_match"] >= 0.7  # the task is still learned


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_replay_in_preference_training_is_a_lever_the_probes_see(task, tiny_llama, replay_source, tmp_path):
    """DPO and KTO add the replay texts' language-model loss to each step: the text probe's perplexity falls where
    without replay it does not, and the preference is still learned."""
    from test_preference_tiny import preference_recipe, write_pairs

    from tunelab import api
    from tunelab.recipe import validate_recipe

    write_pairs(tmp_path / "pairs")
    choice, text = write_probes(tmp_path)

    def run(name: str, replay: dict | None = None) -> dict:
        recipe = preference_recipe(tiny_llama, tmp_path / "pairs", task=task, method={"name": "lora", "r": 8},
                                   preference={"beta": 0.5},
                                   train={"epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32"},
                                   eval={"generate": {"num_samples": 0},
                                         "retention": {"enabled": True, "probes": [choice, text], "max_length": 32,
                                                       "batch_size": 4}})
        if replay is not None:
            recipe["data"]["replay"] = replay
        return api.train(validate_recipe(recipe), str(tmp_path / name))[1]

    plain = run("plain")
    replayed = run("replayed", {"source": str(replay_source), "template": "{line}", "fraction": 0.5})
    assert plain["replay_rows"] == 0 and replayed["replay_rows"] == 40  # 0.5 × 80 train pairs
    without = plain["retention"]["change"]["toy_text"]["word_perplexity"]
    with_replay = replayed["retention"]["change"]["toy_text"]["word_perplexity"]
    assert with_replay["significant"] and with_replay["high"] < 1
    assert with_replay["ratio"] < without["ratio"] - 0.2  # seen: 0.72 against 1.07 (dpo)
    assert replayed["after"]["preference_accuracy"] >= 0.9  # the preference is still learned
    logged = [json.loads(line) for line in (tmp_path / "replayed" / "log.jsonl").read_text().splitlines()]
    assert any("replay_loss" in row for row in logged)


def test_a_decoder_run_without_retention_says_how_to_turn_it_on(tiny_llama, qa_data, tmp_path, capsys):
    from test_generative_tiny import generative_recipe

    from tunelab import api
    from tunelab.recipe import validate_recipe

    recipe = generative_recipe(tiny_llama, qa_data, task="pretrain", train={"max_steps": 1, "precision": "fp32"})
    _, metrics = api.train(validate_recipe(recipe), str(tmp_path / "run"))
    assert "retention" not in metrics
    assert "add eval.retention.enabled: true" in capsys.readouterr().out


@pytest.mark.parametrize(("task", "section", "message"), [
    ("classify", {"eval": {"retention": {"enabled": True}}}, "eval.retention scores decoders"),
    ("grpo", {"data": {"replay": {"source": "x"}}, "reward": {"function": "exact_match"}},
     "data.replay trains on general text alongside the task"),
    ("sft", {"data": {"replay": {"source": "x"}, "streaming": True}}, "data.replay samples rows"),
])
def test_retention_and_replay_are_refused_where_they_do_not_apply(task, section, message):
    from tunelab.recipe import validate_recipe

    raw = {"name": "r", "task": task, "model": {"name": "m"}, "data": {"source": "s"}, "train": {"max_steps": 1}}
    for key, value in section.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(TunelabError, match=message):
        validate_recipe(raw)


def test_a_probe_that_is_neither_built_in_nor_a_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(TunelabError, match="neither a built-in probe"):
        retention.load_probes(["hellaswag"], None, None)
    one = tmp_path / "a" / "same.txt"
    two = tmp_path / "b" / "same.txt"
    for path in (one, two):
        path.parent.mkdir()
        path.write_text("some text\n")
    with pytest.raises(TunelabError, match="two probes 'same'"):
        retention.load_probes([str(one), str(two)], None, None)
