"""Studio and `tunelab tune` studies, checked on the real `tunelab ui` process over study folders written by hand (the
files `tunelab tune` writes, no training): the Studies table, a study's page, its trials opened by their nested
names, malformed and escaping study folders, and one Chromium walk from the runs page to a trial's run page."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import yaml
from studio import StudioServer, make_old

CHROMIUM = Path("/usr/bin/chromium")
SPACE = {"train.learning_rate": {"log_uniform": [0.0005, 0.015]}, "train.epochs": {"int": [1, 8]}}
VERDICT = "0.4444 → 0.7556 (+0.3111 [+0.178, +0.467])"


def recipe(name: str, learning_rate: float = 0.005, epochs: int = 4) -> dict:
    return {"name": name, "task": "classify", "model": {"name": "tiny-bert", "max_length": 32},
            "data": {"source": "nowhere", "text": "sentence", "label": "sentiment"}, "method": "full",
            "train": {"epochs": epochs, "learning_rate": learning_rate, "batch_size": 8}}


def write_run(folder: Path, recipe_: dict, after: float | None = None, pruned: bool = False) -> Path:
    """A run folder as `tunelab train` leaves it: finished (metrics.json) with `after`, pruned (pruned.json), or
    neither."""
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe_))
    (folder / "log.jsonl").write_text("".join(json.dumps({"step": step, "time": float(step), "epoch": step / 3,
                                                          "loss": 1.0 / step}) + "\n" for step in (1, 2, 3)))
    if after is not None:
        (folder / "metrics.json").write_text(json.dumps({"before": {"accuracy": 0.3}, "after": {"accuracy": after}}))
    if pruned:
        (folder / "pruned.json").write_text(json.dumps({"trial": 2, "values": {}, "last_epoch": 1.0}))
    return folder


def write_study(folder: Path, summary: dict | str | None = None, trials: dict[int, tuple] | None = None) -> Path:
    """A study folder: tune.json, trials/trial-NNN (number: (learning rate, validation accuracy or None, pruned)),
    and study.json when `summary` is given."""
    folder.mkdir(parents=True)
    (folder / "tune.json").write_text(json.dumps({
        "recipe_path": "recipe.yaml", "recipe": recipe("toy"), "space": SPACE, "metric": "accuracy",
        "study_name": folder.name, "storage": "postgresql://user:secret-password@db/optuna", "trials": 3,
        "timeout": None, "workers": 1, "refit": False, "seed": 42}))
    for number, (learning_rate, score, pruned) in (trials or {}).items():
        write_run(folder / "trials" / f"trial-{number:03d}", recipe(f"trial-{number:03d}", learning_rate), score,
                  pruned)
    if summary is not None:
        (folder / "study.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    return folder


def finished_summary(name: str) -> dict:
    """study.json of a study of three trials (two complete, one pruned) whose tuned recipe won."""
    trial = {"last_epoch": 4.0, "yours": False, "seconds": 12.5}
    return {
        "study": name, "storage": "postgresql://user:secret-password@db/optuna", "metric": "accuracy",
        "direction": "maximize", "recipe": "recipe.yaml", "space": SPACE,
        "data": {"source": "nowhere", "validation": "train (validation 20%)", "reported": "test",
                 "reported_is_split": True, "train_rows": 72, "validation_rows": 18},
        "refit": False, "counts": {"complete": 2, "pruned": 1, "fail": 0, "running": 0, "waiting": 0},
        "trials_seconds": 37.5, "wall_seconds": 61.0,
        "final": {"best_trial": 1, "best_values": {"train.learning_rate": 0.0135, "train.epochs": 7},
                  "best_validation_score": 0.8333, "reported_on": "test",
                  "runs": {"yours": "final/yours", "winner": "final/winner"},
                  "yours": {"accuracy": 0.4444}, "winner": {"accuracy": 0.7556},
                  "intervals": {"accuracy": {"yours": {"low": 0.289, "high": 0.578},
                                             "winner": {"low": 0.622, "high": 0.867}}},
                  "gain": {"accuracy": {"value": 0.3111, "low": 0.178, "high": 0.467, "significant": True,
                                        "p_value": 0.0005}},
                  "verdict": {"accuracy": VERDICT}},
        "trials": [{**trial, "number": 0, "state": "complete", "values": {"train.learning_rate": 0.005,
                                                                          "train.epochs": 4},
                    "score": 0.3333, "run": "trials/trial-000", "yours": True},
                   {**trial, "number": 1, "state": "complete", "values": {"train.learning_rate": 0.0135,
                                                                          "train.epochs": 7},
                    "score": 0.8333, "run": "trials/trial-001"},
                   {**trial, "number": 2, "state": "pruned", "values": {"train.learning_rate": 0.0007,
                                                                        "train.epochs": 1},
                    "score": None, "last_epoch": 1.0, "run": "trials/trial-002"}],
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """An ordinary run, a finished study, one killed half-way, one with malformed files, and ones leading out."""
    root = tmp_path_factory.mktemp("studies")
    runs = root / "runs"
    write_run(runs / "toy-run", recipe("toy-run"), after=0.6)
    study = write_study(runs / "toy-tune", finished_summary("toy-tune"),
                        {0: (0.005, 0.3333, False), 1: (0.0135, 0.8333, False), 2: (0.0007, None, True)})
    (study / "report.html").write_text("<html><body><h1>tunelab study</h1><script>ran = 1</script></body></html>")
    (study / "best_recipe.yaml").write_text(yaml.safe_dump(recipe("toy-tuned", 0.0135, 7)))
    write_run(study / "final" / "yours", recipe("yours"), after=0.4444)
    write_run(study / "final" / "winner", recipe("winner", 0.0135, 7), after=0.7556)
    write_study(runs / "half-tune", trials={0: (0.005, 0.5, False), 1: (0.01, None, True), 2: (0.002, None, False)})
    write_study(runs / "broken-tune", {
        "study": ["not", "a", "name"], "metric": "accuracy", "direction": "sideways",
        "counts": {"complete": "two", "pruned": 1, "fail": -1},
        "final": {"best_validation_score": float("nan"), "runs": {"yours": "../../toy-run", "winner": "/etc"},
                  "gain": {"accuracy": {"value": "big"}}, "verdict": {"accuracy": ["<b>not text</b>"]}},
        "trials": [{"number": 0, "state": "complete", "score": "high", "values": {"lr": [1, 2], "epochs": 3},
                    "run": "../../toy-run"},
                   {"number": "one", "state": "complete", "score": 0.9},
                   "not a trial",
                   {"number": 2, "state": "complete", "score": 0.7, "run": "trials/trial-002"}]},
        {2: (0.005, 0.7, False)})
    (runs / "broken-tune" / "tune.json").write_text('{"recipe": "not a recipe", "metric": 7, "trials": "many"}')
    write_study(runs / "unreadable-tune", "{ not json", {0: (0.005, 0.55, False)})
    outside = write_run(root / "outside-trial", recipe("outside"), after=0.9)
    (root / "outside-study").mkdir()
    (root / "outside-study" / "tune.json").write_text(json.dumps({"metric": "accuracy"}))
    (runs / "linked-study").symlink_to(root / "outside-study", target_is_directory=True)
    leaky = write_study(runs / "leaky-tune", finished_summary("leaky-tune"))
    (leaky / "trials").mkdir()
    (leaky / "trials" / "trial-000").symlink_to(outside, target_is_directory=True)
    write_run(root / "outside-trials" / "trial-000", recipe("outside"), after=0.99)
    (write_study(runs / "linked-trials-tune") / "trials").symlink_to(root / "outside-trials", target_is_directory=True)
    write_run(root / "outside-final" / "winner", recipe("outside"), after=0.99)
    (write_study(runs / "linked-final-tune") / "final").symlink_to(root / "outside-final", target_is_directory=True)
    faked = runs / "faked-tune"
    faked.mkdir()
    (faked / "tune.json").symlink_to(root / "outside-study" / "tune.json")
    for folder in runs.iterdir():
        make_old(folder)
    return root


@pytest.fixture(scope="module")
def server(root):
    studio = StudioServer(root / "runs")
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Origin": server.url, "Host": f"127.0.0.1:{server.port}"}) as client:
        yield client


def listing(client) -> dict:
    response = client.get("/api/runs")
    assert response.status_code == 200, response.text
    return response.json()


def test_each_study_is_one_row_and_only_its_final_runs_are_among_the_runs(client):
    body = listing(client)
    studies = {row["name"]: row for row in body["studies"]}
    assert set(studies) == {"toy-tune", "half-tune", "broken-tune", "unreadable-tune", "leaky-tune",
                            "linked-trials-tune", "linked-final-tune"}
    assert studies["toy-tune"] == {
        "name": "toy-tune", "study": "toy-tune", "task": "classify", "model": "tiny-bert", "metric": "accuracy",
        "direction": "maximize", "planned": 3, "counts": {"complete": 2, "pruned": 1, "fail": 0}, "best": 0.8333,
        "verdict": {"metric": "accuracy", "text": VERDICT}, "status": "finished", "report": True,
        "started": studies["toy-tune"]["started"]}
    names = {row["name"] for row in body["runs"]}
    # no trials, no study as a run, no final run of a final/ folder leading out of the runs folder
    assert names == {"toy-run", "toy-tune/final/yours", "toy-tune/final/winner"}
    assert "secret-password" not in json.dumps(body)  # a storage URL may carry one


def test_the_study_page_lists_every_trial_with_its_run(client):
    response = client.get("/api/study", params={"name": "toy-tune"})
    assert response.status_code == 200, response.text
    study = response.json()
    assert [(t["number"], t["state"], t["score"], t["run"]) for t in study["trials"]] == [
        (0, "complete", 0.3333, "toy-tune/trials/trial-000"), (1, "complete", 0.8333, "toy-tune/trials/trial-001"),
        (2, "pruned", None, "toy-tune/trials/trial-002")]
    assert study["trials"][1]["values"] == {"train.learning_rate": 0.0135, "train.epochs": 7}
    assert study["keys"] == ["train.learning_rate", "train.epochs"] and study["trials"][0]["yours"] is True
    assert study["final"]["runs"] == {"yours": "toy-tune/final/yours", "winner": "toy-tune/final/winner"}
    assert study["final"]["gain"]["accuracy"]["significant"] is True and study["best_recipe"] is True
    assert study["data"]["validation_rows"] == 18 and "secret-password" not in response.text
    assert client.get("/api/study", params={"name": "toy-run"}).status_code == 404  # a run is not a study


def test_a_trial_opens_on_the_run_page_by_its_nested_name(client):
    response = client.get("/api/run", params={"name": "toy-tune/trials/trial-001"})
    assert response.status_code == 200, response.text
    trial = response.json()
    assert trial["name"] == "toy-tune/trials/trial-001" and trial["status"] == "finished"
    assert trial["headline"] == {"metric": "accuracy", "before": 0.3, "after": 0.8333}
    assert trial["study"] == {"name": "toy-tune", "role": "trial"}
    assert client.get("/api/run", params={"name": "toy-tune/final/winner"}).json()["study"] == {
        "name": "toy-tune", "role": "final"}
    assert client.get("/files/toy-tune/trials/trial-001/metrics.json").json()["after"] == {"accuracy": 0.8333}
    pruned = client.get("/api/run", params={"name": "toy-tune/trials/trial-002"}).json()
    assert pruned["status"] == "pruned" and [row["step"] for row in pruned["log"]] == [1, 2, 3]
    refused = client.post("/api/resume", json={"run": "toy-tune/trials/trial-002"})  # the study resumes its trials
    assert refused.status_code == 400 and "tunelab tune --resume --output" in refused.json()["error"]
    assert client.get("/api/run", params={"name": "toy-tune"}).status_code == 404  # a study is not a run


def test_the_studys_report_is_served_sandboxed(client):
    response = client.get("/files/toy-tune/report.html")
    assert response.status_code == 200 and b"tunelab study" in response.content
    assert response.headers["content-security-policy"].startswith("sandbox")  # its scripts do not run


def test_a_study_killed_half_way_shows_its_trials_from_their_folders(client):
    row = next(row for row in listing(client)["studies"] if row["name"] == "half-tune")
    assert row["status"] == "interrupted" and row["verdict"] is None  # no study.json; nothing written lately
    assert row["counts"] == {"complete": 1, "pruned": 1, "fail": 0} and row["best"] == 0.5
    study = client.get("/api/study", params={"name": "half-tune"}).json()
    assert [(t["number"], t["state"], t["score"]) for t in study["trials"]] == [
        (0, "complete", 0.5), (1, "pruned", None), (2, "unfinished", None)]
    assert study["trials"][1]["values"] == {"train.learning_rate": 0.01, "train.epochs": 4}
    assert study["trials"][2]["run"] == "half-tune/trials/trial-002" and study["final"] is None


def test_a_study_written_to_a_moment_ago_is_running(root):
    from tunelab.ui.runs_index import RunsIndex
    from tunelab.ui.studies import StudiesIndex

    runs = root / "fresh-runs"
    write_study(runs / "fresh-tune", trials={0: (0.005, None, False)})
    studies = StudiesIndex(RunsIndex(runs))
    assert [(row["name"], row["status"], row["counts"]["complete"]) for row in studies.rows()] == [
        ("fresh-tune", "running", 0)]
    (runs / "fresh-tune" / "trials" / "trial-000" / "metrics.json").write_text(json.dumps({"after": {"accuracy": 0.6}}))
    make_old(runs / "fresh-tune")
    assert [(row["status"], row["counts"]["complete"], row["best"]) for row in studies.rows()] == [
        ("interrupted", 1, 0.6)]  # the cached row follows the trial that finished


def test_a_malformed_study_shows_what_can_be_read_and_never_a_500(client):
    rows = {row["name"]: row for row in listing(client)["studies"]}
    broken = rows["broken-tune"]
    assert broken["study"] == "broken-tune" and broken["task"] is None and broken["planned"] is None
    assert broken["counts"] == {"complete": None, "pruned": 1, "fail": None}
    assert broken["verdict"] is None and broken["best"] == 0.7 and broken["status"] == "finished"
    response = client.get("/api/study", params={"name": "broken-tune"})
    assert response.status_code == 200, response.text
    study = response.json()
    assert study["direction"] == "maximize" and study["final"]["runs"] == {"yours": None, "winner": None}
    assert study["final"]["gain"] == {} and study["final"]["verdict"] == {}
    assert [(t["number"], t.get("score"), t["run"], t.get("values")) for t in study["trials"]] == [
        (0, None, None, {"epochs": 3}),  # a bad score and value dropped alone; a run outside the study not linked
        (2, 0.7, "broken-tune/trials/trial-002", None)]  # a trial without a number is not shown
    unreadable = client.get("/api/study", params={"name": "unreadable-tune"}).json()  # study.json is not JSON
    assert unreadable["status"] == "finished" and unreadable["metric"] == "accuracy"
    assert [(t["number"], t["state"], t["score"]) for t in unreadable["trials"]] == [(0, "complete", 0.55)]


def test_study_folders_leading_out_of_the_runs_folder_are_not_followed(client):
    rows = {row["name"]: row for row in listing(client)["studies"]}
    assert "linked-study" not in rows and "faked-tune" not in rows  # a folder or a tune.json symlinked out
    # a fresh file out there, or a fresh link to it, does not make a study run
    assert rows["linked-final-tune"]["status"] == rows["linked-trials-tune"]["status"] == "interrupted"
    for name in ("linked-study", "faked-tune", "..", "../outside-study", "toy-tune/../.."):
        assert client.get("/api/study", params={"name": name}).status_code == 404
    leaky = client.get("/api/study", params={"name": "leaky-tune"}).json()
    assert [trial["run"] for trial in leaky["trials"]] == [None, None, None]
    assert client.get("/api/run", params={"name": "leaky-tune/trials/trial-000"}).status_code == 404
    assert client.get("/files/leaky-tune/trials/trial-000/metrics.json").status_code == 404
    linked = client.get("/api/study", params={"name": "linked-trials-tune"}).json()  # the trials folder leads out
    assert linked["trials"] == [] and linked["best"] is None


def test_the_board_reads_the_file_names_tune_writes():
    from tunelab.tune import plan, study, trials
    from tunelab.ui import runs_index, studies

    assert (runs_index.PLAN_FILE, studies.STUDY_FILE, studies.BEST_RECIPE, runs_index.FINAL_RUNS) == (
        plan.PLAN_FILE, study.STUDY_FILE, study.BEST_RECIPE, study.FINAL_RUNS)
    assert (runs_index.TRIALS, runs_index.PRUNED_FILE, studies.LOWER_IS_BETTER) == (
        trials.TRIALS, trials.PRUNED_FILE, plan.LOWER_IS_BETTER)


@pytest.mark.skipif(not CHROMIUM.is_file() and not os.environ.get("CI"),
                    reason="needs Debian's chromium (apt-get install chromium)")
def test_the_runs_page_lists_the_study_and_leads_to_a_trials_run_page(server, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    shots = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        # without the pages' CSP, which forbids the string Playwright's wait_for_function evaluates (the header itself
        # is checked in test_ui_security.py); every request is still checked below
        page = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True).new_page()
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.set_default_timeout(60_000)
        page.goto(server.url + "/")
        row = page.locator('#studies-table tr[data-study="toy-tune"]')
        row.wait_for()
        cells = row.locator("td").all_inner_texts()
        assert cells[:4] == ["toy-tune", "classify", "tiny-bert", "accuracy (higher wins)"]
        assert cells[4:8] == ["2 · 1 · 0 of 3", "0.8333", VERDICT, "finished"]
        assert row.locator("a", has_text="report.html").get_attribute("href") == "/files/toy-tune/report.html"
        page.screenshot(path=str(shots / "studies_table.png"))
        row.locator("a", has_text="toy-tune").click()
        page.wait_for_selector('#trials tr[data-trial="2"]')
        assert page.locator("#title").inner_text() == "Study toy-tune"
        assert page.locator('#trials tr[data-trial="2"] .status').inner_text() == "pruned"
        assert page.locator("#outcome-table tr[data-metric='accuracy']").inner_text().split("\t")[-1] == \
            "better (p = 0.0005)"
        page.screenshot(path=str(shots / "study_page.png"), full_page=True)
        page.locator('#trials tr[data-trial="1"] a').click()
        page.wait_for_function("document.getElementById('status').textContent === 'finished'")
        assert page.url.endswith("/run?name=toy-tune%2Ftrials%2Ftrial-001")
        assert page.locator("#title").inner_text() == "toy-tune/trials/trial-001"
        assert page.locator("#headline .value").inner_text() == "0.3000 → 0.8333"
        assert page.locator("#study a").inner_text() == "toy-tune" and page.locator("#resume").is_hidden()
        browser.close()
    outside = [url for url in requests if not url.startswith(server.url + "/") and not url.startswith("data:")]
    assert requests and not outside, f"requests outside the board: {outside}"
