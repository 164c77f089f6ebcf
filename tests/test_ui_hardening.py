"""Studio against hostile input, checked on the real `tunelab ui` process (httpx, and one Chromium page): run names
that are paths, recipes naming code with side effects, foreign Host headers and missing tokens (DNS rebinding, open
binds), and run folders written to break the board (wrong types, symlinks out, markup, lone surrogates)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import toy_recipe
from studio import free_port, make_old

import tunelab
from tunelab.errors import TunelabError
from tunelab.recipe import load_recipe, validate_recipe

SOURCE = str(Path(tunelab.__file__).parents[1])  # the tunelab under test (the old one too, via PYTHONPATH)
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "s3cret-board-token"
MARKUP = '<img src=x onerror="window.pwned=1"><b>bold</b>'
SIDE_EFFECT_MODULE = "tunelab_side_effect_probe"


class Board:
    """`python -m tunelab ui` on a free loopback port, with extra arguments and environment."""

    def __init__(self, runs: Path, extra: list[str] | None = None, env: dict | None = None,
                 python_path: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs = runs
        self.log = runs.parent / f"ui-{self.port}.log"
        path = os.pathsep.join([SOURCE, *(python_path or [])])
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tunelab", "ui", "--runs", str(runs), "--port", str(self.port), *(extra or [])],
                stdout=output, stderr=subprocess.STDOUT, cwd=runs.parent,
                env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=self.own_origin())
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(self.url + "/api/runs", timeout=5, headers={"Authorization": f"Bearer {TOKEN}"})
                return
            except httpx.TransportError:
                assert self.process.poll() is None, self.log.read_text()
                assert time.time() < deadline, "tunelab ui did not answer within 60 s"
                time.sleep(0.2)

    def own_origin(self) -> dict:
        return {"Origin": self.url, "Host": f"127.0.0.1:{self.port}"}

    def close(self) -> None:
        self.client.close()
        self.process.send_signal(2)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def write_run(folder: Path, recipe: dict | str, log: list | None = None, metrics: dict | str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    if log is not None:
        (folder / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    if metrics is not None:
        (folder / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """root/d1/d2/runs (deep, so that `../../../x` names still land inside root), a secret beside it, a module
    whose import leaves a file, and run folders made to break the board."""
    root = tmp_path_factory.mktemp("hardening")
    runs = root / "d1" / "d2" / "runs"
    (root / "secret.txt").write_text("not for the board")
    code = root / "code"
    (code / f"{SIDE_EFFECT_MODULE}_pkg").mkdir(parents=True)
    touch = f"import pathlib\npathlib.Path({str(root / 'imported')!r}).write_text(__name__)\n"
    (code / f"{SIDE_EFFECT_MODULE}.py").write_text(touch + "def score(completions, **_):\n    return [0.0]\n")
    (code / f"{SIDE_EFFECT_MODULE}_pkg" / "__init__.py").write_text(touch)
    (code / f"{SIDE_EFFECT_MODULE}_pkg" / "rewards.py").write_text("def score(completions, **_):\n    return [0.0]\n")

    toy = write_run(runs / "toy-run", {"name": "toy", "task": "classify", "model": {"name": "nowhere"}})
    (toy / "predictions.jsonl").write_text('{"text": "private prediction"}\n')
    (toy / "model.safetensors").write_bytes(b"private weights")
    write_run(runs / "poisoned", {"name": "poisoned", "task": MARKUP, "model": {"name": MARKUP}, "method": "full"},
              log=[{"step": 1, "time": 1.0, "epoch": 0.1, "loss": 2.0, "max_steps": MARKUP},
                   {"step": 2, "time": 2.0, "epoch": 0.2, "loss": 1.5, "max_steps": "10", "eval_" + MARKUP: 0.5,
                    "eval_accuracy": "high"}],
              metrics={"before": {"accuracy": 0.25}, "after": {"accuracy": 0.75},
                       "train_samples_per_second": "fast"})
    outside = write_run(root / "outside-run", {"name": "outside", "task": "classify"},
                        metrics={"before": {"accuracy": 0.1}, "after": {"accuracy": 0.9}})
    (runs / "linked-out").symlink_to(outside, target_is_directory=True)
    leaky = write_run(runs / "leaky", "name: placeholder\n")
    (leaky / "recipe.yaml").unlink()
    (leaky / "recipe.yaml").symlink_to(root / "secret.txt")
    for folder in runs.iterdir():
        make_old(folder)
    return root


@pytest.fixture(scope="module")
def board(root):
    board = Board(root / "d1" / "d2" / "runs", python_path=[str(root / "code")])
    yield board
    board.close()


@pytest.fixture(scope="module")
def token_board(root):
    """A board that needs a token (as on a non-loopback bind), answering one extra name besides loopback."""
    runs = root / "token-runs"
    write_run(runs / "toy-run", {"name": "toy", "task": "classify"})
    board = Board(runs, extra=["--allowed-hosts", "board.lan"], env={"TUNELAB_UI_TOKEN": TOKEN})
    yield board
    board.close()


def files_outside(root: Path, runs: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file() and not path.is_relative_to(runs)}


# Finding 7: a recipe `name` built paths outside the runs folder.

@pytest.mark.parametrize("name", ["../../../escaped", "ABSOLUTE"])
def test_a_run_name_that_is_a_path_writes_nothing_outside_the_runs_folder(board, root, tiny_bert, toy_data, name):
    from tunelab.ui import forms

    name = str(root / "absolute") if name == "ABSOLUTE" else name
    values = forms.recipe_values(validate_recipe(toy_recipe(tiny_bert, toy_data)).model_dump(mode="json"))
    before = files_outside(root, board.runs)
    response = board.client.post("/api/start", json={"values": {**values, "name": name}})
    time.sleep(0.5)  # a queued job would write its folder right away
    assert files_outside(root, board.runs) == before
    assert not list((board.runs / ".studio").rglob("*.yaml"))
    result = response.json()
    assert response.status_code == 200 and result["ok"] is False and result["field"] == "name"
    assert board.client.get("/api/runs").json()["jobs"]["queued"] == []


@pytest.mark.parametrize("name", ["../x", "/tmp/x", ".", "..", "a/b", "a b", "-flag", ".hidden", "x" * 129, ""])
def test_the_recipe_schema_refuses_run_names_that_are_not_slugs(tmp_path, name):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": name, "task": "classify", "model": {"name": "m"},
                                    "data": {"source": "d"}}))
    with pytest.raises(TunelabError, match="is not a valid run name; use letters, digits"):
        load_recipe(path)


def test_names_of_examples_and_earlier_runs_still_fit():
    for name in ["toy-fast", "tweet_sentiment", "sft-20240131-235959-2", "v1.2_run", "x" * 128]:
        assert validate_recipe({"name": name, "task": "classify", "model": {"name": "m"},
                                "data": {"source": "d"}}).name == name
    examples = Path(__file__).resolve().parents[1] / "examples"
    for path in examples.glob("*.yaml"):
        if "stages" not in yaml.safe_load(path.read_text()):
            load_recipe(path)


# Finding 8: /api/validate imported the module a recipe names, inside the board's process.

@pytest.mark.parametrize("function", [f"{SIDE_EFFECT_MODULE}:score", f"{SIDE_EFFECT_MODULE}_pkg.rewards:score"])
def test_validate_never_imports_the_code_a_recipe_names(board, root, function):
    values = {"name": "judged", "task": "dpo", "model.name": "nowhere", "data.source": "nowhere",
              "eval.judge.function": function, "eval.generate.num_samples": "4"}
    result = board.client.post("/api/validate", json={"values": values}).json()
    assert not (root / "imported").exists(), "the board ran the recipe's module"
    assert result["ok"] is False and "nowhere" in result["error"]  # checking went on to the data


def test_validate_still_names_a_module_that_cannot_be_found(board):
    values = {"name": "judged", "task": "dpo", "model.name": "nowhere", "data.source": "nowhere",
              "eval.judge.function": "no_such_module_anywhere:score", "eval.generate.num_samples": "4"}
    result = board.client.post("/api/validate", json={"values": values}).json()
    assert result["ok"] is False and "no_such_module_anywhere" in result["error"]


# Finding 9: GETs answered any Host (DNS rebinding); no token on an open bind.

GUARDED = ["/", "/run?name=toy-run", "/static/common.js", "/api/runs", "/api/run?name=toy-run",
           "/files/toy-run/predictions.jsonl", "/files/toy-run/model.safetensors"]


@pytest.mark.parametrize("path", GUARDED)
def test_a_foreign_host_is_refused_on_every_route(board, path):
    response = httpx.get(board.url + path, headers={"Host": f"rebound.example:{board.port}"})
    assert response.status_code == 400 and "DNS rebinding" in response.json()["error"]
    assert b"private" not in response.content
    assert httpx.get(board.url + path).status_code == 200  # the board's own name still works


@pytest.mark.parametrize("path", GUARDED)
def test_a_token_board_refuses_every_route_without_its_token(token_board, path):
    path = path.replace("predictions.jsonl", "recipe.yaml").replace("model.safetensors", "recipe.yaml")
    refused = httpx.get(token_board.url + path)
    assert refused.status_code == 401 and "token" in refused.json()["error"]
    assert httpx.get(token_board.url + path, headers={"X-Tunelab-Token": "wrong"}).status_code == 401
    for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"X-Tunelab-Token": TOKEN}):
        assert httpx.get(token_board.url + path, headers=headers).status_code == 200


def test_the_token_url_sets_a_strict_cookie_that_opens_the_board(token_board):
    first = httpx.get(f"{token_board.url}/run?name=toy-run&token={TOKEN}")
    assert first.status_code == 303 and first.headers["location"] == "/run?name=toy-run"  # token off the URL
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    with httpx.Client(base_url=token_board.url, cookies=first.cookies) as browser_like:
        assert browser_like.get("/api/runs").status_code == 200
        assert browser_like.get("/static/run.js").status_code == 200
    assert httpx.get(f"{token_board.url}/api/runs?token={TOKEN}").status_code == 200


def test_a_token_board_still_checks_origin_and_host(token_board):
    token = {"Authorization": f"Bearer {TOKEN}"}
    foreign = httpx.post(token_board.url + "/api/stop", json={"run": "toy-run"},
                         headers={**token, "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    own = httpx.post(token_board.url + "/api/stop", json={"run": "toy-run"},
                     headers={**token, **token_board.own_origin()})
    assert own.status_code == 400 and "not running or queued" in own.json()["error"]
    lan = httpx.get(token_board.url + "/api/runs", headers={**token, "Host": f"board.lan:{token_board.port}"})
    assert lan.status_code == 200  # --allowed-hosts
    other = httpx.get(token_board.url + "/api/runs", headers={**token, "Host": f"other.lan:{token_board.port}"})
    assert other.status_code == 400


def test_only_loopback_binds_go_without_a_token(tmp_path):
    from tunelab.ui.security import board_token

    assert board_token("127.0.0.1", environ={}) == (None, "none")
    assert board_token("::1", environ={}) == (None, "none")
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        token, origin = board_token(host, environ={})
        assert origin == "generated" and len(token) >= 32
    assert board_token("0.0.0.0", environ={"TUNELAB_UI_TOKEN": "abc"}) == ("abc", "env")
    (tmp_path / "token").write_text("from-file\n")
    assert board_token("127.0.0.1", str(tmp_path / "token"), environ={}) == ("from-file", "file")


# Finding 10: run folders are untrusted input.

def test_a_poisoned_log_answers_200_and_drops_only_the_bad_values(board):
    response = board.client.get("/api/run?name=poisoned")
    assert response.status_code == 200
    run = response.json()
    assert run["progress"]["max_steps"] is None and run["progress"]["step"] == 2
    assert [(row["step"], row["loss"]) for row in run["log"]] == [(1, 2.0), (2, 1.5)]
    assert "eval_accuracy" not in run["log"][1] and run["log"][1]["eval_" + MARKUP] == 0.5


def test_a_string_samples_per_second_keeps_the_runs_table(board):
    response = board.client.get("/api/runs")
    assert response.status_code == 200
    row = next(row for row in response.json()["runs"] if row["name"] == "poisoned")
    assert row["samples_per_second"] is None and row["headline"]["after"] == 0.75


def test_a_symlink_out_of_the_runs_folder_is_not_followed(board):
    names = [row["name"] for row in board.client.get("/api/runs").json()["runs"]]
    assert "linked-out" not in names and "toy-run" in names
    assert board.client.get("/api/run?name=linked-out").status_code == 404
    leaky = board.client.get("/api/run?name=leaky")
    assert "not for the board" not in leaky.text


def test_non_finite_numbers_in_metrics_are_dropped(tmp_path):
    from tunelab.runs.reading import read_metrics

    (tmp_path / "metrics.json").write_text('{"before": {"accuracy": NaN, "loss": 1}, "after": {"accuracy": 0.5},'
                                           ' "train_samples_per_second": Infinity}')
    assert read_metrics(tmp_path) == {"before": {"loss": 1.0}, "after": {"accuracy": 0.5}}


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/predict", {"run": "toy-run", "text": "a\ud800b"}),
    ("POST", "/api/chat", {"run": "toy-run", "text": "a\ud800b"}),
    ("POST", "/api/predict", {"run": "\ud800", "text": "a"}),
    ("POST", "/api/stop", {"run": "\ud800"}),
    ("POST", "/api/resume", {"run": "bad\x00name"}),
    ("POST", "/api/validate", {"values": {"name": "\ud800"}}),
    ("POST", "/api/predict", "not json at all"),
    ("GET", "/api/run?name=bad%00name", None),
    ("GET", "/api/form/values?kind=example&name=bad%00name", None),
    ("GET", "/api/form/values?kind=run&name=%ED%A0%80", None),
], ids=["predict-text", "chat-text", "predict-run", "stop-run", "resume-nul", "validate-value", "not-json",
        "run-nul", "example-nul", "run-bad-utf8"])
def test_bad_input_is_a_json_error_never_a_500(board, method, path, body):
    content = body if isinstance(body, str) else json.dumps(body) if body is not None else None
    response = board.client.request(method, path, content=content, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]


# The pages show run-folder values as text.

@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (apt-get install chromium)")
def test_markup_from_a_run_folder_shows_as_literal_text(board):
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        # without the pages' CSP, so that injected markup would run and be seen
        page = browser.new_context(bypass_csp=True).new_page()
        page.set_default_timeout(30_000)
        page.goto(board.url + "/")
        page.wait_for_selector('tr[data-run="poisoned"]')
        row = page.locator('tr[data-run="poisoned"]')
        assert MARKUP in row.inner_text()
        assert row.locator("img").count() == 0 and row.locator("b", has_text="bold").count() == 0
        page.goto(board.url + "/run?name=poisoned")
        page.wait_for_selector("#step .value")
        assert page.locator("#what").inner_text() == f"{MARKUP} · {MARKUP} · full"
        assert MARKUP in page.locator("#latest-eval").inner_text()
        assert page.locator("#step .value").inner_text() == "2"
        assert page.locator("main img, main b").count() == 0
        assert page.evaluate("window.pwned") is None
        browser.close()


def test_a_generation_that_fails_ends_its_stream_with_the_error(tiny_llama):
    """The playground's stream used to wait forever for pieces from a generate that had raised (a tiny temperature
    underflowed), and a few dozen such requests locked every route of the board."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.inference.generator import stream_generate
    from tunelab.recipe import GenerateConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = tokenizer("the chair")["input_ids"]

    def broken_forward(*args, **kwargs):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    model.forward = broken_forward
    started = time.monotonic()
    with pytest.raises(TunelabError, match="generation failed: RuntimeError: probability tensor"):
        list(stream_generate(model, tokenizer, prompt, GenerateConfig(max_new_tokens=8)))
    assert time.monotonic() - started < 10


def test_a_tiny_temperature_streams_the_greedy_answer(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.inference.generator import stream_generate
    from tunelab.recipe import GenerateConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = tokenizer("the chair")["input_ids"]
    greedy = "".join(stream_generate(model, tokenizer, prompt, GenerateConfig(max_new_tokens=12)))
    tiny = "".join(stream_generate(model, tokenizer, prompt, GenerateConfig(max_new_tokens=12, temperature=1e-300)))
    assert greedy and tiny == greedy
