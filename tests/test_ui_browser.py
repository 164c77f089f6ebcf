"""Studio in a real browser: Playwright drives Debian's Chromium (headless) against the real `tunelab ui` process,
over seeded run folders made with tiny random models. Each test saves a screenshot (into $TUNELAB_SCREENSHOTS when
set, as the README's are made) and checks that every request the pages made went to the board itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import toy_recipe
from studio import StudioServer, make_old, seed_unfinished

from tunelab import api
from tunelab.recipe import validate_recipe

CHROMIUM = Path("/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api")
# Outside CI a machine without chromium skips these; in CI (.ci/run installs it) a missing browser fails them.
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file() and not os.environ.get("CI"),
                                reason="needs Debian's chromium (apt-get install chromium)")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %} is{% else %}</s>"
                 "{% endif %}{% endfor %}")
ANSWERS = {"pos": "good", "neg": "bad", "neu": "table"}


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_llama, toy_data, tmp_path_factory) -> Path:
    """Two finished classifier runs (learning rates apart), a finished chat sft run, an interrupted and a failed
    run."""
    runs = tmp_path_factory.mktemp("studio") / "runs"
    fast = toy_recipe(tiny_bert, toy_data, name="toy-fast")
    fast["train"].update(epochs=4)
    slow = toy_recipe(tiny_bert, toy_data, name="toy-slow")
    slow["train"].update(epochs=4, learning_rate=5e-4)
    for recipe in (fast, slow):  # no validation split: score the reported split each epoch for the curves only
        recipe["eval"] = {"each_epoch": True}
    for recipe in (fast, slow):
        api.train(validate_recipe(recipe), str(runs / recipe["name"]))
    qa = tmp_path_factory.mktemp("qa")
    for split, source in (("train", "train.jsonl"), ("test", "test.jsonl")):
        rows = [json.loads(line) for line in (toy_data / source).read_text().splitlines()]
        (qa / f"{split}.jsonl").write_text("".join(json.dumps({"sentence": r["sentence"], "answer":
                                                               ANSWERS[r["sentiment"]]}) + "\n" for r in rows))
    chat = {"name": "toy-chat", "task": "sft", "model": {"name": str(tiny_llama), "max_length": 32},
            "data": {"source": str(qa), "prompt_template": "{sentence}", "response_template": " {answer}",
                     "chat_template": CHAT_TEMPLATE},
            "method": "full", "train": {"epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32"},
            "eval": {"generate": {"max_new_tokens": 3, "num_samples": 8}}}
    api.train(validate_recipe(chat), str(runs / "toy-chat"))
    for name in ("toy-fast", "toy-slow", "toy-chat"):
        make_old(runs / name)
    seed_unfinished(runs / "toy-fast", runs / "toy-interrupted")
    seed_unfinished(runs / "toy-fast", runs / "toy-failed", error="RuntimeError: out of memory (seeded failure)")
    return runs


@pytest.fixture(scope="module")
def server(runs):
    studio = StudioServer(runs)
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def browser(server):  # after the server, so that the browser's connections close before the server stops
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: $TUNELAB_SCREENSHOTS (docs/studio for the README), else the test's tmp folder."""
    folder = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, server, request, shots):
    """A fresh page; afterwards its screenshot is saved and every request it made is checked to be the board's."""
    # Playwright's wait_for_function evaluates strings, which the pages' Content-Security-Policy forbids (the header
    # itself is checked in test_ui_security.py); every request is still recorded and checked below.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    # generous: under `pytest -n 2` a training job in the other worker shares the cores with the board's
    # validation subprocess (30 s was hit on a loaded machine); a broken page still fails, just later
    page.set_default_timeout(120_000)
    yield page
    page.screenshot(path=str(shots / f"{request.node.name.removeprefix('test_')}.png"))
    context.close()
    outside = [url for url in requests if not url.startswith(server.url + "/") and not url.startswith("data:")]
    assert requests and not outside, f"requests outside the board: {outside}"


def status_of(page, run: str) -> str:
    return page.locator(f'tr[data-run="{run}"] .status').inner_text()


def test_runs_page_shows_each_seeded_runs_status(page, server):
    page.goto(server.url + "/")
    page.wait_for_selector('tr[data-run="toy-failed"]')
    statuses = {run: status_of(page, run) for run in ("toy-fast", "toy-slow", "toy-chat", "toy-interrupted",
                                                       "toy-failed")}
    assert statuses == {"toy-fast": "finished", "toy-slow": "finished", "toy-chat": "finished",
                        "toy-interrupted": "interrupted", "toy-failed": "failed"}
    row = page.locator('tr[data-run="toy-fast"]').inner_text()
    metrics = json.loads((server_runs(server) / "toy-fast" / "metrics.json").read_text())
    assert f"accuracy {metrics['before']['accuracy']:.4f} → {metrics['after']['accuracy']:.4f}" in row
    page.click('th[data-key="name"]')  # sort by name, A→Z
    names = page.locator("#runs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.run)")
    assert names == sorted(names)


def server_runs(server: StudioServer) -> Path:
    return Path(server.process.args[server.process.args.index("--runs") + 1])


def open_form_from(page, server, run: str) -> None:
    page.goto(f"{server.url}/new?from=run:{run}")
    page.wait_for_function("document.querySelector('#f-model-name') && document.querySelector('#f-model-name').value")


def test_bad_form_value_shows_tunelabs_error_by_the_field_and_starts_nothing(page, server):
    open_form_from(page, server, "toy-fast")
    before = server.get_json("/api/runs")
    page.fill("#f-train-epochs", "-1")
    page.click("#validate")
    error = page.locator("#error-f-train-epochs")
    error.wait_for(state="visible")
    assert "'train.epochs' = -1 is invalid" in error.inner_text()
    page.click("#start")
    page.wait_for_selector("#result.error")
    page.fill("#f-train-epochs", "2")
    page.fill("#f-data-text", "no_such_column")  # passes the schema, caught by the data check
    page.click("#start")
    page.wait_for_function("document.querySelector('#error-f-data-text').textContent.includes('no_such_column')")
    after = server.get_json("/api/runs")
    assert after["jobs"] == before["jobs"] == {"current": None, "queued": [], "ended": []}
    assert [r["name"] for r in after["runs"]] == [r["name"] for r in before["runs"]]


def test_the_form_shows_the_chosen_tasks_own_sections(page, server):
    open_form_from(page, server, "toy-fast")
    assert page.locator("#f-preference-loss").count() == 0  # a classify recipe: no preference section
    page.select_option("#f-task", "dpo")
    page.locator("#f-preference-loss").wait_for()
    assert page.locator("#f-preference-desirable_weight").count() == 0  # kto's, not dpo's
    page.select_option("#f-task", "kto")
    page.locator("#f-preference-desirable_weight").wait_for()
    assert page.locator("#f-preference-loss").count() == 0


def start_from_form(page, server, name: str, **fields: str) -> str:
    """Fill the New-run form from toy-fast's recipe, press Start; the new run's name."""
    open_form_from(page, server, "toy-fast")
    page.fill("#f-name", name)
    for field, value in fields.items():
        page.fill(f"#f-{field.replace('.', '-')}", value)
    page.click("#start")
    link = page.locator("#result a")
    link.wait_for()
    return link.inner_text()


def wait_for_status(page, status: str, timeout_s: float = 240) -> None:
    page.wait_for_function(f"document.getElementById('status')?.textContent === '{status}'",
                           timeout=timeout_s * 1000)


def test_new_run_from_the_form_shows_live_progress_and_finishes(page, server, shots):
    run = start_from_form(page, server, "toy-new", **{"train.epochs": "20"})
    page.goto(f"{server.url}/run?name={run}")
    # live: the step counter moves on a page that is not reloaded, under a loss curve drawn from log.jsonl
    page.wait_for_function("/^[1-9]\\d* \\/ \\d+$/.test((document.querySelector('#step .value')?.textContent || ''))",
                           timeout=240_000)
    first = page.locator("#step .value").inner_text()
    assert page.locator("#status").inner_text() == "running"
    page.wait_for_function(f"(document.querySelector('#step .value')?.textContent || '') !== '{first}'",
                           timeout=120_000)
    assert page.locator("#loss path.series").count() >= 1
    page.screenshot(path=str(shots / "run_page_while_training.png"))
    wait_for_status(page, "finished")
    metrics = json.loads((server_runs(server) / run / "metrics.json").read_text())
    assert metrics["after"]["accuracy"] > metrics["before"]["accuracy"]
    page.goto(server.url + "/")
    page.wait_for_selector(f'tr[data-run="{run}"]')
    assert status_of(page, run) == "finished"
    page.goto(f"{server.url}/run?name={run}")  # finished: the report's content, the recipe and the files
    page.wait_for_selector("iframe.report")
    assert page.frame_locator("iframe.report").locator("h2", has_text="Before and after training").count() == 1
    assert "epochs: 20" in page.locator("#recipe").inner_text()
    assert page.locator("#files a", has_text="metrics.json").count() == 1


def test_stop_then_resume_finishes_the_run(page, server):
    run = start_from_form(page, server, "toy-stopped", **{"train.epochs": "24"})
    folder = server_runs(server) / run
    page.goto(f"{server.url}/run?name={run}")
    page.locator("#stop").wait_for(state="visible", timeout=240_000)
    # Stop once a checkpoint exists (every epoch of 12 steps), so Resume has something to continue from.
    page.wait_for_function("Number((document.querySelector('#step .value')?.textContent || '').split(' ')[0]) >= 30",
                           timeout=240_000)
    page.click("#stop")
    wait_for_status(page, "interrupted", 120)
    assert not (folder / "metrics.json").exists() and any((folder / "checkpoints").glob("checkpoint-*"))
    stopped_at = max(json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines())
    page.click("#resume")
    wait_for_status(page, "finished", 300)
    steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1, "the resumed run must continue from its checkpoint, not start again"
    assert max(steps) == 24 * 12 > stopped_at
    assert not (folder / "ui_error.txt").exists()


def test_compare_overlays_both_curves_and_shows_the_recipe_difference(page, server):
    page.goto(f"{server.url}/compare?runs=toy-fast,toy-slow")
    page.wait_for_selector("#recipe-diff")
    names = page.locator("#loss-chart path.series").evaluate_all("paths => paths.map(p => p.dataset.name)")
    assert {"toy-fast: train loss", "toy-slow: train loss", "toy-fast: eval loss", "toy-slow: eval loss"} <= set(names)
    diff = page.locator("#recipe-diff").inner_text()
    assert "train.learning_rate" in diff and "name" in diff
    assert "train.epochs" not in diff and "model.name" not in diff  # only the keys that differ
    fast = json.loads((server_runs(server) / "toy-fast" / "metrics.json").read_text())["after"]["accuracy"]
    slow = json.loads((server_runs(server) / "toy-slow" / "metrics.json").read_text())["after"]["accuracy"]
    row = page.locator("#metrics-after tr", has_text="accuracy").first.inner_text()
    if fast != slow:
        better = page.locator("#metrics-after tr", has_text="accuracy").first.locator("td.better").inner_text()
        assert better.startswith(f"{max(fast, slow):.4f}")
    assert f"{fast:.4f}" in row and f"{slow:.4f}" in row


def test_playground_classifies_a_text_and_streams_base_beside_tuned(page, server):
    page.goto(f"{server.url}/playground?run=toy-fast")
    page.fill("#text", "this day was awful")
    page.click("#predict")
    page.wait_for_selector("#labels td")
    cells = page.locator("#labels tr").evaluate_all("rows => rows.slice(1).map(r => [r.cells[0].textContent, "
                                                    "Number(r.cells[1].textContent)])")
    expected = api.predict(str(server_runs(server) / "toy-fast"), ["this day was awful"], top_k=3)[0]["top"]
    assert [label for label, _ in cells] == [row["label"] for row in expected]
    assert [p for _, p in cells] == pytest.approx([row["probability"] for row in expected], abs=1e-3)
    assert sum(p for _, p in cells) == pytest.approx(1, abs=1e-3)

    page.select_option("#run", "toy-chat")
    page.fill("#prompt", "the day was sad")
    page.fill("#tokens", "2")
    page.click("#send")
    page.wait_for_function("['base', 'tuned'].every(w => document.getElementById('answer-' + w).dataset.done)")
    tuned = page.locator("#answer-tuned").inner_text().strip()
    base = page.locator("#answer-base").inner_text().strip()
    assert page.locator("#answer-tuned").get_attribute("data-done") == "yes" == page.locator(
        "#answer-base").get_attribute("data-done")
    assert tuned.split()[0] == "bad"  # the fine-tuned model learned the answer; the random base did not
    assert base and base != tuned
