"""Property-based fuzzing of `tunelab serve` and `tunelab ui` with Schemathesis: requests generated from each app's own
OpenAPI schema (valid ones and ones that break it) go to a real server process on a free loopback port.

The properties: no request ends in a 5xx, a dropped connection, a timeout, a server error reported inside an event
stream or a stream without its last event; serve answers every 4xx with OpenAI's error object, the board with JSON;
after the fuzz the server is healthy and its process alive. Most requests name the served model (serve) or a real
run (the board: a classifier run and a chat run), so that they get past those checks to the logic behind them.

Examples per endpoint: TUNELAB_FUZZ_EXAMPLES (default 25, about two minutes for the file on 2 cores; 200
for a thorough run). By default a failure stops that endpoint and Hypothesis shrinks it to a small request;
TUNELAB_FUZZ_KEEP_GOING=1 sends every example and lists every failing request at the end (a survey).
Before them each endpoint gets Schemathesis's boundary cases (its coverage phase: limits, just past them, wrong types,
missing fields), then its plain valid request with each value in turn given a lone surrogate, a tiny float or a
number as a string (MUTATIONS; Schemathesis never sends lone surrogates itself); TUNELAB_FUZZ_COVERAGE=0 leaves these
out. Half of the generated requests get one such mutation too.
TUNELAB_FUZZ_LOG=FILE appends one JSON line per request: endpoint, status, problem, seconds, the request as a curl
command and the start of the answer.
Generation is derandomized (the same requests every run) and writes no Hypothesis database.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import requests
import test_serve
import test_serve_hardening
from conftest import toy_recipe
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from studio import free_port, make_old
from test_serve import CHAT_TEMPLATE

import tunelab
from tunelab import api
from tunelab.recipe import validate_recipe

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.config import SchemathesisConfig  # noqa: E402 - after the skip when schemathesis is missing
from schemathesis.generation import GenerationMode  # noqa: E402

EXAMPLES = int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "25"))
COVERAGE = os.environ.get("TUNELAB_FUZZ_COVERAGE", "1") not in ("", "0")
KEEP_GOING = os.environ.get("TUNELAB_FUZZ_KEEP_GOING", "") not in ("", "0")
LOG = os.environ.get("TUNELAB_FUZZ_LOG")
REQUEST_TIMEOUT_S = 30  # the slowest valid request (8 choices of 1024 tokens from the tiny decoder) takes ~10 s
# Read event streams to their end (Schemathesis stops after 20 events by default), so that a stream cut off or left
# hanging shows; print requests unmasked (its sanitizer hides fields named like secrets, max_tokens among them); and
# read no schemathesis.toml from the working directory.
CONFIG = SchemathesisConfig.from_dict({"max-stream-events": 100_000, "output": {"sanitization": {"enabled": False}}})
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}

SERVE_ENDPOINTS = [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                   ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/classify"),
                   ("POST", "/v1/score")]
# POST /api/start, /api/stop and /api/resume are not fuzzed: they launch, stop and resume real training runs (each a
# process training for minutes). tests/test_ui_security.py covers their origin checks.
UI_NOT_FUZZED = [("POST", "/api/start"), ("POST", "/api/stop"), ("POST", "/api/resume")]
UI_ENDPOINTS = [("GET", "/api/runs"), ("GET", "/api/run"), ("GET", "/files/{relative}"), ("GET", "/api/form"),
                ("GET", "/api/form/values"), ("POST", "/api/validate"), ("POST", "/api/predict"),
                ("POST", "/api/chat"), ("GET", "/api/study")]
UI_RUNS = ["toy-classify", "toy-chat"]
# the servers' models: a tiny classifier folder, and the tiny llama with a chat template and a 2048-token context
# (conftest's own 64 would refuse most generated max_tokens before they reach the engine)
tiny_classifier = test_serve.tiny_classifier
long_llama = test_serve_hardening.long_llama


class Server:
    """`python -m tunelab ARGS --port PORT` in a subprocess, with its output in a log file."""

    def __init__(self, args: list[str], health: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health, self.log = health, log
        self.schema: dict = {}  # the app's OpenAPI document, built in-process from its create_app
        self.model_id = ""
        env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1]), "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1"}
        env.pop("TUNELAB_API_KEY", None)
        with open(log, "wb") as output:  # the child keeps its own copy of the file handle
            self.process = subprocess.Popen([sys.executable, "-m", "tunelab", *args, "--port", str(self.port)],
                                            env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.healthy():
            assert self.process.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"server not healthy after 120 s: {log.read_text()[-2000:]}"
            time.sleep(0.3)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + self.health, timeout=30).status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self.process.send_signal(2)  # SIGINT, as Ctrl-C: the board interrupts a run it started
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_llama, toy_data, tmp_path_factory) -> Path:
    """A runs folder with a finished classifier run and a finished chat sft run (one epoch each: only finished)."""
    runs = tmp_path_factory.mktemp("fuzz-studio") / "runs"
    classify = toy_recipe(tiny_bert, toy_data, name="toy-classify")
    classify["train"].update(epochs=1)
    api.train(validate_recipe(classify), str(runs / "toy-classify"))
    qa = tmp_path_factory.mktemp("fuzz-qa")
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (toy_data / f"{split}.jsonl").read_text().splitlines()][:24]
        (qa / f"{split}.jsonl").write_text("".join(json.dumps({"sentence": r["sentence"], "answer": r["sentiment"]})
                                                   + "\n" for r in rows))
    chat = {"name": "toy-chat", "task": "sft", "model": {"name": str(tiny_llama), "max_length": 32},
            "data": {"source": str(qa), "prompt_template": "{sentence}", "response_template": " {answer}",
                     "chat_template": CHAT_TEMPLATE},
            "method": "full", "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
            "eval": {"generate": {"max_new_tokens": 2, "num_samples": 4}}}
    api.train(validate_recipe(chat), str(runs / "toy-chat"))
    for name in UI_RUNS:
        make_old(runs / name)
    return runs


@pytest.fixture(scope="module")
def reward_run(tiny_bert, tmp_path_factory) -> Path:
    """A finished one-step reward-model run (served on /v1/score)."""
    from test_preference_tiny import preference_recipe, write_pairs

    pairs = write_pairs(tmp_path_factory.mktemp("fuzz") / "pairs", train=16, test=8)
    recipe = preference_recipe(tiny_bert, pairs, train={"max_steps": 1, "batch_size": 4, "precision": "fp32"})
    return api.train(validate_recipe(recipe), str(tmp_path_factory.mktemp("fuzz-reward") / "toy-reward"))[0]


@pytest.fixture(scope="module")
def targets(long_llama, tiny_classifier, reward_run, runs, tmp_path_factory):
    """The four servers under fuzz, started side by side, each with the OpenAPI schema of its app."""
    from tunelab.serve.app import create_app as serve_app
    from tunelab.serve.engine import load_engine
    from tunelab.ui.app import Settings
    from tunelab.ui.app import create_app as ui_app

    logs = tmp_path_factory.mktemp("fuzz-logs")
    started = {}
    try:
        for name, model in (("generate", long_llama), ("classify", tiny_classifier), ("score", Path(reward_run))):
            started[name] = Server(["serve", str(model), "--max-batch", "4"], "/health", logs / f"{name}.log")
            engine = load_engine(str(model), 4)
            started[name].schema = serve_app(engine, model.name, {model.name}, None).openapi()
            started[name].model_id = model.name
        started["ui"] = Server(["ui", "--runs", str(runs)], "/api/runs", logs / "ui.log")
        started["ui"].schema = ui_app(Settings(runs, Path("examples"), "127.0.0.1", started["ui"].port)).openapi()
        yield started
    finally:
        for server in started.values():
            server.close()


def operations(schema: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, methods in schema["paths"].items() for method in methods}


def test_the_fuzzed_endpoints_are_every_endpoint_of_both_apps(targets):
    assert operations(targets["generate"].schema) == set(SERVE_ENDPOINTS)
    assert operations(targets["classify"].schema) == set(SERVE_ENDPOINTS)
    assert operations(targets["score"].schema) == set(SERVE_ENDPOINTS)
    assert operations(targets["ui"].schema) == set(UI_ENDPOINTS) | set(UI_NOT_FUZZED)


def serve_problem(response, body) -> str | None:
    """What is wrong with a serve response (None: nothing): a 5xx, a 4xx that is not OpenAI's error object, or a
    server error inside an event stream."""
    if response.status_code >= 500:
        return f"{response.status_code}"
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or set(error) != OPENAI_ERROR_FIELDS or not isinstance(error["message"], str):
            return f"{response.status_code} without OpenAI's error object"
    if "server_error" in sse_errors(response):
        return "server_error inside the stream"
    if is_event_stream(response) and not response.text.rstrip().endswith("data: [DONE]"):
        return "the event stream did not end with data: [DONE]"
    return None


def ui_problem(response, body) -> str | None:
    """What is wrong with a board response: a 5xx or an error that is not JSON."""
    if response.status_code >= 500:
        return f"{response.status_code}"
    if response.status_code >= 400 and body is None:
        return f"{response.status_code} that is not JSON"
    last_event = response.text.rstrip().rsplit("\n\n", 1)[-1]
    if is_event_stream(response) and not last_event.startswith(("event: done", "event: error")):
        return "the event stream ended without its done or error event (cut off, or still going at the timeout)"
    return None


def is_event_stream(response) -> bool:
    return any(value.startswith("text/event-stream") for value in response.headers.get("content-type", []))


def sse_errors(response) -> list[str]:
    """The error types reported inside an event stream (serve writes `data: {"error": {...}}`)."""
    if not is_event_stream(response):
        return []
    types = []
    for line in response.text.splitlines():
        if line.startswith("data: {") and '"error"' in line:
            types.append(json.loads(line[len("data: "):]).get("error", {}).get("type", "?"))
    return types


def json_or_none(response):
    try:
        return response.json()
    except ValueError:
        return None


def steer_serve(model_id: str):
    """Mostly name the served model, so that most requests get past the model check to the logic behind it."""
    def steer(case, named: bool) -> None:
        if named and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model_id
    return steer


def steer_ui(case, run: str | None) -> None:
    """Often name a real run (a classifier or a chat run), so that requests reach the model behind it."""
    if run is None:
        return
    if isinstance(case.body, dict) and "run" in case.body:
        case.body["run"] = run
    if isinstance(case.query, dict) and "name" in case.query:
        case.query["name"] = run
        if "kind" in case.query:
            case.query["kind"] = "run"


# Values that broke these servers before and that Schemathesis does not generate on its own (its strings are UTF-8, so
# never hold a lone surrogate; its numbers seldom sit at the edge of a float): one body value of a generated request
# is swapped for one of these, for about half of the requests.
MUTATIONS = ["lone surrogate", "tiny float", "huge float", "negative zero", "number as string", "boolean", "float"]


def count_leaves(node) -> int:
    if isinstance(node, dict):
        return sum(count_leaves(value) for value in node.values())
    if isinstance(node, list):
        return sum(count_leaves(value) for value in node)
    return 1


def mutate(body, how: str, pick: int):
    """`body` with its value number `pick` (of the leaves, in order) changed as `how` says."""
    leaves = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, (*path, index))
        else:
            leaves.append((path, node))

    walk(body, ())
    if not leaves:
        return body
    numbers = [leaf for leaf in leaves if type(leaf[1]) in (int, float)]
    if how in ("tiny float", "huge float", "negative zero") and numbers:
        leaves = numbers  # an edge number where a number is expected reaches the arithmetic behind it
    path, value = leaves[pick % len(leaves)]
    changed = {"lone surrogate": f"{value}\ud800" if isinstance(value, str) else "\udfff",
               "tiny float": 1e-300, "huge float": 1e308, "negative zero": -0.0, "number as string": str(value),
               "boolean": True, "float": float(value) if isinstance(value, int | float) else 1.0}[how]
    node = body
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = changed
    return body


def fuzz(operation, send, problem_of, steer, steering: list) -> tuple[int, list[str]]:
    """Send Schemathesis's boundary cases (unless TUNELAB_FUZZ_COVERAGE=0), then EXAMPLES generated requests, to one
    endpoint; the number sent and the problems found (each with the request as a curl command). Each case is first
    steered with one of `steering` (in turn for the boundary cases, drawn for the generated ones)."""
    sent, problems = [0], []

    def one_request(case, steering, mutation) -> None:
        steer(case, steering)
        # a mutated body goes as the call's own body: Schemathesis re-checks a changed case.body against the schema
        # with a validator that cannot read a lone surrogate
        body = {}
        if mutation is not None and isinstance(case.body, dict | list):
            body = {"json": mutate(copy.deepcopy(case.body), *mutation)}
        started = time.perf_counter()
        headers = send["headers"]
        try:
            response = case.call(base_url=send["url"], headers=dict(headers), timeout=REQUEST_TIMEOUT_S, **body)
            problem = problem_of(response, json_or_none(response))
            status, answer = response.status_code, response.text[:300]
        except (requests.RequestException, OSError) as exc:  # a dropped connection or a timeout is a finding too
            problem, status, answer = f"{type(exc).__name__}: {exc}", None, None
        sent[0] += 1
        curl = None
        if problem or LOG:
            generated, case.body = case.body, body.get("json", case.body)  # the curl command shows what was sent
            curl = case.as_curl_command(headers=dict(headers))
            case.body = generated
        if LOG:
            with open(LOG, "a", encoding="utf-8") as log:
                log.write(json.dumps({"endpoint": operation.label, "status": status, "problem": problem,
                                      "seconds": round(time.perf_counter() - started, 3), "curl": curl,
                                      "answer": answer}) + "\n")
        if problem:
            problems.append(f"{problem}: {curl}")
            if not KEEP_GOING:
                raise AssertionError(f"{operation.label}: {problem}\n{curl}")

    if COVERAGE:
        schema = operation.schema
        boundary = list(schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                                   generation_config=schema.config.generation_for(operation=operation)))
        for index, case in enumerate(boundary):
            one_request(case, steering[index % len(steering)], None)
        # The first boundary case is the plain valid request: each of its values in turn gets a lone surrogate, a
        # tiny float and a number as a string, under each steering (so also with a real model or run behind it).
        plain = next((case for case in boundary if isinstance(case.body, dict)), None)
        if plain is not None:
            for steer_with in dict.fromkeys(steering):
                for pick in range(count_leaves(plain.body)):
                    for how in ("lone surrogate", "tiny float", "number as string"):
                        one_request(plain, steer_with, (how, pick))  # the mutation changes a copy of the body

    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    if operation.body or operation.query or operation.path_parameters:  # nothing to break on /health
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    mutations = st.none()
    if operation.body:
        mutations |= st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 63))
    generated = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck),
                         phases=[Phase.explicit, Phase.generate] + ([] if KEEP_GOING else [Phase.shrink]))(
        given(case=st.one_of(strategies), steering=st.sampled_from(steering), mutation=mutations)(one_request))
    generated()
    return sent[0], problems


def check_endpoint(server: Server, method: str, path: str, problem_of, steer, steering, headers=None) -> None:
    operation = schemathesis.openapi.from_dict(server.schema, config=CONFIG)[path][method]
    started = time.perf_counter()
    sent, problems = fuzz(operation, {"url": server.url, "headers": headers or {}}, problem_of, steer, steering)
    print(f"{method} {path}: {sent} requests in {time.perf_counter() - started:.1f} s, "
          f"{len(problems)} problems")
    assert not problems, "\n".join(dict.fromkeys(problems))  # every failing request, once
    assert server.process.poll() is None, f"the server died: {server.log.read_text()[-2000:]}"
    assert server.healthy(), f"the server is not healthy after the fuzz: {server.log.read_text()[-2000:]}"


@pytest.mark.parametrize(("method", "path"), SERVE_ENDPOINTS, ids=[f"{m} {p}" for m, p in SERVE_ENDPOINTS])
@pytest.mark.parametrize("kind", ["generate", "classify", "score"])
def test_serve_answers_fuzzed_requests_without_5xx_and_with_openai_errors(targets, kind, method, path):
    server = targets[kind]
    check_endpoint(server, method, path, serve_problem, steer_serve(server.model_id), [True, True, True, False])


@pytest.mark.parametrize(("method", "path"), UI_ENDPOINTS, ids=[f"{m} {p}" for m, p in UI_ENDPOINTS])
def test_ui_answers_fuzzed_requests_without_5xx_and_with_json_errors(targets, method, path):
    server = targets["ui"]
    # the board's own page: past the origin check, so the fuzz reaches what is behind it
    own_page = {"Origin": server.url, "Host": f"127.0.0.1:{server.port}"}
    check_endpoint(server, method, path, ui_problem, steer_ui, [None, *UI_RUNS, *UI_RUNS], own_page)

