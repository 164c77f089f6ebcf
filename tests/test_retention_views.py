"""A decoder run's retained general ability (metrics.json's `retention` block, runs/artifacts.py) as people see it:
a section of report.html, the run page's table and the compare page's side-by-side columns; a run without the block
looks as before, and a malformed block is dropped quietly (read typed, never a 500)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from studio import StudioServer, make_old
from test_ui_hardening import CHROMIUM, write_run

from tunelab.evaluation import retention as scorer
from tunelab.runs.reading import read_metrics, retention_rows
from tunelab.runs.report import write_report

# The block as the brief of issue 28 writes it: PIQA unchanged within its interval, WikiText significantly worse.
BLOCK = {
    "before": {"piqa": {"acc": 0.63, "acc_norm": 0.64, "items": 300},
               "wikitext": {"word_perplexity": 41.2, "byte_perplexity": 1.9, "bits_per_byte": 0.93, "documents": 10,
                            "tokens": 20480}},
    "after": {"piqa": {"acc": 0.62, "acc_norm": 0.65, "items": 300},
              "wikitext": {"word_perplexity": 48.9, "byte_perplexity": 2.0, "bits_per_byte": 0.99, "documents": 10,
                           "tokens": 20480}},
    "change": {"piqa": {"acc": {"before": 0.63, "after": 0.62, "interval_before": {"low": 0.575, "high": 0.684},
                                "interval_after": {"low": 0.565, "high": 0.674}, "change": -0.01, "low": -0.03,
                                "high": 0.01, "significant": False, "p_value": 0.4},
                        "acc_norm": {"before": 0.64, "after": 0.65, "interval_before": {"low": 0.585, "high": 0.694},
                                     "interval_after": {"low": 0.596, "high": 0.703}, "change": 0.01, "low": -0.01,
                                     "high": 0.03, "significant": False, "p_value": 0.5}},
               "wikitext": {"word_perplexity": {"before": 41.2, "after": 48.9,
                                                "interval_before": {"low": 38.0, "high": 44.9},
                                                "interval_after": {"low": 45.1, "high": 53.0}, "ratio": 1.19,
                                                "low": 1.15, "high": 1.22, "significant": True}}},
    "summary": "retained: PIQA acc 0.630 → 0.620 (−0.010 [−0.030, +0.010], no significant change); WikiText word "
               "ppl 41.2 → 48.9 (+19% [+15%, +22%])",
    "seconds": 83.2,
}
RUN_METRICS = {"before": {"loss": 2.0}, "after": {"loss": 1.5}, "trainable_params": 1000, "train_seconds": 1.0,
               "train_samples_per_second": 10.0}


def with_block(block) -> dict:
    return {**copy.deepcopy(RUN_METRICS), "retention": copy.deepcopy(block)}


def headings(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


# report.html

def test_the_report_shows_retained_general_ability_with_intervals_and_verdicts(tmp_path):
    page = write_report(tmp_path, "run", with_block(BLOCK), "name: run\n").read_text()
    assert headings(page)[:2] == ["Before and after training", "Retained general ability"]
    section = page.split("<h2>Retained general ability</h2>")[1].split("<h2>")[0]
    assert section.startswith("<table class=retention><tr><th>probe</th><th>metric</th><th>before</th>")
    assert ("<tr><td>PIQA (300 items)</td><td>acc</td><td>0.630 [0.575, 0.684]</td><td>0.620 [0.565, 0.674]</td>"
            "<td>−0.010 [−0.030, +0.010]</td><td>no significant change (p = 0.4)</td></tr>") in section
    assert ("<td>WikiText (10 documents, 20,480 tokens)</td><td>word_perplexity</td><td>41.2 [38.0, 44.9]</td>"
            "<td>48.9 [45.1, 53.0]</td><td class=loss>+19% [+15%, +22%]</td><td class=loss>worse</td>") in section
    assert BLOCK["summary"] in section and "83.2 s" in section


def test_a_report_without_the_block_looks_as_before(tmp_path):
    page = write_report(tmp_path, "run", copy.deepcopy(RUN_METRICS), "name: run\n").read_text()
    assert headings(page) == ["Before and after training", "Run", "Recipe"]
    assert "retain" not in page.lower() and "PIQA" not in page


def test_a_report_leaves_out_a_block_that_does_not_fit_and_still_writes(tmp_path):
    page = write_report(tmp_path, "run", with_block("garbage"), "name: run\n").read_text()
    assert headings(page) == ["Before and after training", "Run", "Recipe"]


# reading a run folder

def read_back(tmp_path: Path, metrics: dict | str) -> dict | None:
    (tmp_path / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    return read_metrics(tmp_path)


def test_a_well_formed_block_reads_back_whole(tmp_path):
    assert read_back(tmp_path, with_block(BLOCK))["retention"] == BLOCK


def test_the_block_the_scorer_writes_reads_back_whole(tmp_path):
    right_before = np.array([1, 0, 1, 1, 0, 1, 0, 1] * 5)
    before = {"piqa": {"acc": 0.6, "acc_norm": 0.6, "items": 40,
                       "per_row": {"acc": right_before.tolist(), "acc_norm": right_before.tolist()}},
              "notes": {"word_perplexity": 30.0, "documents": 4, "tokens": 80,
                        "per_row": {"loglikelihood": [-60.0, -70.0, -65.0, -80.0], "words": [20, 20, 20, 20],
                                    "bytes": [100, 100, 100, 100]}}}
    after = copy.deepcopy(before)
    after["piqa"]["per_row"] = {"acc": [0] * 40, "acc_norm": [0] * 40}
    after["notes"]["per_row"]["loglikelihood"] = [-70.0, -80.0, -75.0, -90.0]
    change = scorer.compare(before, after)
    block = {"before": {name: scorer.headline(scores) for name, scores in before.items()},
             "after": {name: scorer.headline(scores) for name, scores in after.items()},
             "change": change, "summary": scorer.summarize(change), "seconds": 1.5}
    read = read_back(tmp_path, with_block(block))["retention"]
    assert read == json.loads(json.dumps(block))
    rows = {(row["name"], row["metric"]): row["verdict"] for row in retention_rows(read)}
    assert rows == {("PIQA", "acc"): "worse", ("PIQA", "acc_norm"): "worse", ("notes", "word_perplexity"): "worse"}


@pytest.mark.parametrize("block", [
    "retained", [1, 2], {"change": "all of it"}, {"change": {"piqa": {"acc": {"before": "high", "after": 0.5}}}},
    {"before": {"piqa": {"acc": "NaN"}}, "after": {"piqa": {"acc": [0.6]}}, "summary": 5},
], ids=["text", "list", "change-text", "before-text", "wrong-types"])
def test_a_malformed_block_drops_quietly_and_the_metrics_stay(tmp_path, block):
    assert read_back(tmp_path, with_block(block)) == RUN_METRICS


def test_a_bad_value_inside_the_block_drops_alone(tmp_path):
    block = copy.deepcopy(BLOCK)
    block["change"]["piqa"]["acc"]["low"] = "NaN"
    block["change"]["piqa"]["acc_norm"]["before"] = None  # a comparison without its before: that metric goes
    block["change"]["wikitext"]["word_perplexity"]["interval_after"] = {"low": 1}
    metrics = read_back(tmp_path, json.dumps(with_block(block)).replace('"NaN"', "NaN"))
    rows = retention_rows(metrics["retention"])
    assert [(row["probe"], row["metric"]) for row in rows] == [("piqa", "acc"), ("wikitext", "word_perplexity")]
    assert rows[0]["low"] is None and rows[0]["high"] == 0.01 and rows[0]["after"] == 0.62
    assert rows[1]["interval_after"] is None and rows[1]["ratio"] == 1.19 and rows[1]["verdict"] == "worse"
    assert metrics["retention"]["summary"] == BLOCK["summary"]


def test_a_comparison_with_several_bad_values_costs_only_that_comparison(tmp_path):
    block = copy.deepcopy(BLOCK)
    block["change"]["piqa"]["acc"] = {"ratio": "high"}  # its before and after missing, its ratio text: three errors
    rows = retention_rows(read_back(tmp_path, with_block(block))["retention"])
    assert [(row["probe"], row["metric"]) for row in rows] == [("piqa", "acc_norm"), ("wikitext", "word_perplexity")]



# Studio: /api/run (which both the run page and the compare page read), and the pages in Chromium

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two decoder runs with retention (the second forgot PIQA), a classifier run without, one with a bad block."""
    runs = tmp_path_factory.mktemp("retention-views") / "runs"
    forgot = copy.deepcopy(BLOCK)
    forgot["change"]["piqa"]["acc"].update(after=0.55, interval_after={"low": 0.494, "high": 0.606}, change=-0.08,
                                           low=-0.11, high=-0.05, significant=True, p_value=0.0004)
    forgot["summary"] = "retained: PIQA acc 0.630 → 0.550 (−0.080 [−0.110, −0.050])"
    decoder = {"task": "sft", "model": {"name": "tiny-llama"}, "method": "lora"}
    write_run(runs / "chat-kept", {"name": "chat-kept", **decoder}, metrics=with_block(BLOCK))
    write_run(runs / "chat-forgot", {"name": "chat-forgot", **decoder}, metrics=with_block(forgot))
    write_run(runs / "classifier", {"name": "classifier", "task": "classify"}, metrics=copy.deepcopy(RUN_METRICS))
    write_run(runs / "bad-block", {"name": "bad-block", **decoder}, metrics=with_block({"change": {"piqa": 1}}))
    for folder in runs.iterdir():
        make_old(folder)
    studio = StudioServer(runs)
    yield studio
    studio.close()


def test_the_run_api_carries_the_retention_table(server):
    run = server.get_json("/api/run?name=chat-kept")
    assert run["metrics"]["retention"] == BLOCK
    assert run["retention"]["summary"] == BLOCK["summary"] and run["retention"]["seconds"] == 83.2
    rows = {(row["probe"], row["metric"]): row for row in run["retention"]["rows"]}
    assert list(rows) == [("piqa", "acc"), ("piqa", "acc_norm"), ("wikitext", "word_perplexity")]
    assert rows["piqa", "acc"]["name"] == "PIQA" and rows["piqa", "acc"]["size"] == "300 items"
    assert rows["piqa", "acc"]["interval_after"] == {"low": 0.565, "high": 0.674}
    assert rows["piqa", "acc"]["verdict"] == "no significant change"
    assert (rows["wikitext", "word_perplexity"]["ratio"], rows["wikitext", "word_perplexity"]["verdict"]) == \
        (1.19, "worse")


def test_runs_without_a_usable_block_carry_none(server):
    for name in ("classifier", "bad-block"):
        run = server.get_json(f"/api/run?name={name}")
        assert run["retention"] is None and "retention" not in run["metrics"]
        assert run["metrics"]["after"] == {"loss": 1.5}


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (apt-get install chromium)")
def test_the_run_and_compare_pages_show_the_retained_figures(server):
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page()  # with the pages' own Content-Security-Policy
        page.set_default_timeout(30_000)
        page.goto(f"{server.url}/run?name=chat-forgot")
        page.wait_for_selector("#retention-table")
        piqa = page.locator('#retention-table tr[data-probe="piqa"][data-metric="acc"]').inner_text()
        assert piqa.split("\t") == ["PIQA\n300 items\n", "acc", "0.630 [0.575, 0.684]", "0.550 [0.494, 0.606]",
                                    "−0.080 [−0.110, −0.050]", "worse (p = 0.0004)"]
        assert page.locator("#retention-summary").inner_text().startswith("retained: PIQA acc 0.630 → 0.550")
        page.goto(f"{server.url}/compare?runs=chat-kept,chat-forgot,classifier")
        page.wait_for_selector("#retention-compare")
        cells = page.locator('#retention-compare tr[data-metric="acc"] td').all_inner_texts()
        assert [cell.replace("\n", " | ") for cell in cells] == [
            "PIQA · acc", "0.620 | −0.010 [−0.030, +0.010] · no significant change (p = 0.4)",
            "0.550 | −0.080 [−0.110, −0.050] · worse (p = 0.0004)", "–"]
        ppl = page.locator('#retention-compare tr[data-metric="word_perplexity"] td').all_inner_texts()
        assert ppl[1].startswith("48.9\n+19% [+15%, +22%] · worse")
        browser.close()
