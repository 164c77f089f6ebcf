"""`tunelab serve` against what a hostile or broken client sends (a security review's findings, one test each):
lone surrogates, a batch-poisoning temperature, a client hanging up mid-answer, a body shorter than announced,
foreign Host headers (DNS rebinding), and lax types or silently ignored OpenAI parameters.

Three real servers on free loopback ports (generator, encoder with a key, classifier), started once for the module
with the same flags the old code knew, so every test fails on the old code for its own reason; the new flags
(--allowed-hosts, --api-key-file) are checked through `tunelab serve` in this process with its HTTP server (run_http)
replaced."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import test_serve
from starlette.testclient import TestClient
from test_serve import CHAT_TEMPLATE, client, free_port, greedy, wait_until_healthy
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tunelab.cli import main
from tunelab.serve import app as serve_app
from tunelab.serve.engine import decoder_engine

G, E, C = "generate", "embed", "classify"
CHAT, COMPLETIONS, EMBEDDINGS, CLASSIFY = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/classify"
API_KEY = "hardening-key-456"
BODY_TIMEOUT_S = 1.0  # TUNELAB_SERVE_BODY_TIMEOUT of the servers here
USER = [{"role": "user", "content": "good day"}]
tiny_classifier = test_serve.tiny_classifier  # test_serve's fixture, found by pytest under this name


@pytest.fixture(scope="module")
def long_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama with a chat template and a context of 2048 tokens, room for a 1000-token answer."""
    folder = tmp_path_factory.mktemp("long-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(tiny_llama, max_position_embeddings=2048).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hardened(long_llama, tiny_bert, tiny_classifier, tmp_path_factory):
    """Three servers started side by side: generation (max batch 4), embeddings (key from env), classify."""
    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TUNELAB_SERVE_BODY_TIMEOUT": str(BODY_TIMEOUT_S)}
    env.pop("TUNELAB_API_KEY", None)
    logs = tmp_path_factory.mktemp("hardening-logs")
    started = {}
    for name, model, extra_env in [(G, long_llama, {}), (E, tiny_bert, {"TUNELAB_API_KEY": API_KEY}),
                                   (C, tiny_classifier, {})]:
        port = free_port()
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed at teardown
        process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(model), "--port", str(port),
                                    "--max-batch", "4", "--dtype", "float32"], env={**env, **extra_env}, stdout=log,
                                   stderr=subprocess.STDOUT)
        started[name] = (process, f"http://127.0.0.1:{port}", log, logs / f"{name}.log")
    try:
        for name, (process, url, _, log_path) in started.items():
            wait_until_healthy(process, url, log_path, API_KEY if name == E else None)
        yield {name: url for name, (_, url, _, _) in started.items()} | {
            f"{name}_log": log_path for name, (_, _, _, log_path) in started.items()}
    finally:
        for process, _, log, _ in started.values():
            process.terminate()
            process.wait(timeout=20)
            log.close()


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 30) -> httpx.Response:
    """POST `body` as JSON; json.dumps writes a lone surrogate as the (valid JSON) escape \\ud800."""
    return httpx.post(url, content=json.dumps(body).encode(), timeout=timeout,
                      headers={"Content-Type": "application/json", **(headers or {})})


def openai_error(response: httpx.Response, status: int) -> dict:
    """The error object of an OpenAI-shaped error answer with `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"].endswith("_error"), error
    return error


# -- 1. lone surrogates ---------------------------------------------------------------------------------------
SURROGATE_CASES = [  # (id, server, path, body without model, param)
    ("chat content", G, CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ("chat text part", G, CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]},
     "messages.0.content.0.text"),
    ("prompt", G, COMPLETIONS, {"prompt": "a\ud800b"}, "prompt"),
    ("stop", G, COMPLETIONS, {"prompt": "the day", "stop": "x\ud800"}, "stop"),
    ("embeddings input", E, EMBEDDINGS, {"input": "a\ud800b"}, "input"),
    ("classify input", C, CLASSIFY, {"input": ["a fine day", "a\ud800b"]}, "input.1"),
]
SERVED = {G: "long_llama", E: "tiny_bert", C: "tiny_classifier"}


@pytest.mark.parametrize(("server", "path", "body", "param"), [case[1:] for case in SURROGATE_CASES],
                         ids=[case[0] for case in SURROGATE_CASES])
def test_lone_surrogate_is_a_400_naming_the_field(hardened, request, server, path, body, param):
    model = request.getfixturevalue(SERVED[server]).name
    response = post(hardened[server] + path, {"model": model, **body},
                    {"Authorization": f"Bearer {API_KEY}"} if server == E else None)
    error = openai_error(response, 400)
    assert error["param"] == param and "surrogate" in error["message"]


def test_control_characters_are_ordinary_text(hardened, long_llama, tiny_classifier):
    text = "a good\tday\nthe\x00chair\x1b was fine"
    answer = client(hardened[G]).chat.completions.create(
        model=long_llama.name, messages=[{"role": "user", "content": text}], max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    response = post(hardened[C] + CLASSIFY, {"model": tiny_classifier.name, "input": [text]})
    assert response.status_code == 200 and response.json()["data"][0]["text"] == text


# -- 2. one request poisoning its batch -----------------------------------------------------------------------
def test_a_tiny_temperature_does_not_poison_its_batch(hardened, long_llama):
    """A row whose temperature underflows to inf/NaN in the sampler used to fail its whole batch. The four requests
    join a running long greedy answer (continuous batching), so they share its batch whenever each one arrives."""
    url, prompts = hardened[G], ["the day was", "a lovely chair", "the window is", "this paper was"]
    temperatures = [1e-300, 0, 0, 0]
    result: dict[str, httpx.Response] = {}
    runner = start_long_answer(url, lambda: result.update(
        long=post(f"{url}{COMPLETIONS}", long_answer(long_llama.name, 600), timeout=120)))
    answers: dict[int, httpx.Response] = {}
    start = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = post(f"{url}{COMPLETIONS}", {"model": long_llama.name, "prompt": prompts[i], "max_tokens": 6,
                                                   "temperature": temperatures[i]})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared = "long" not in result  # the long answer was still running: every row joined its batch
    runner.join()
    assert shared, "the long answer ended before the four rows were answered; lengthen it"
    assert [answers[i].status_code for i in range(len(prompts))] == [200] * len(prompts), answers[0].text
    assert result["long"].status_code == 200, result["long"].text
    texts = [answers[i].json()["choices"][0]["text"] for i in range(len(prompts))]
    # greedy rows keep their answers; the tiny temperature samples as greedy does
    assert texts == [greedy(long_llama, prompt, 6, chat=False) for prompt in prompts]


def test_a_row_failing_while_sampling_ends_alone_and_its_batch_finishes(long_llama):
    engine = decoder_engine(str(long_llama), 4)
    prompts = ["the day was", "a lovely chair", "the window is"]

    async def drain(choice) -> tuple[str, str, str]:
        text = ""
        while (event := await choice.events.get())[0] == "text":
            text += event[1]
        return text, *event

    async def run_batch() -> list[tuple[str, str, str]]:
        settings = dict(max_tokens=6, top_p=1.0, stops=[], n=1)
        rows = [engine.submit(engine.text_prompt(p), temperature=0, seed=None, **settings)[0] for p in prompts]
        broken = engine.submit(engine.text_prompt("the door"), temperature=1.0, seed=3, **settings)[0]
        broken.generator = "not a generator"  # drawing from it raises, in the middle of the batch
        decoder = engine.batcher.decoder

        def decode() -> None:  # what the decoding thread does, here in one thread: all four join at once
            decoder.admit(engine.batcher.arrivals())
            assert len(decoder.rows) + sum(row.finished for row in [*rows, broken]) == 4
            while decoder.rows:
                decoder.step()

        await asyncio.to_thread(decode)
        return [await drain(choice) for choice in [*rows, broken]]

    results = asyncio.run(run_batch())
    assert [text for text, _, _ in results[:3]] == [greedy(long_llama, p, 6, chat=False) for p in prompts]
    assert [kind for _, kind, _ in results[:3]] == ["done"] * 3
    assert results[3][1] == "error" and "generation failed" in results[3][2]


def test_a_short_request_joins_a_running_long_one_instead_of_waiting_for_it(hardened, long_llama):
    """Continuous batching: a 4-token request sent while a 1,000-token answer is being decoded joins the running
    batch at the next step and answers within 2x of its time alone (it used to wait for all 1,000 tokens)."""
    url = hardened[G]
    short = {"model": long_llama.name, "prompt": "a chair", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    alone = min(timed_post(f"{url}{COMPLETIONS}", short) for _ in range(3))
    result: dict[str, float] = {}
    runner = start_long_answer(url, lambda: result.update(
        long=timed_post(f"{url}{COMPLETIONS}", long_answer(long_llama.name, 1000), 120)))
    beside = min(timed_post(f"{url}{COMPLETIONS}", short) for _ in range(3))  # best of 3, as alone
    still_running = "long" not in result
    runner.join()
    assert still_running and beside < 2 * alone, (beside, alone, result)
    assert beside < result["long"] / 5  # it did not wait for the long answer


def long_answer(model: str, tokens: int) -> dict:
    """A greedy completion of exactly `tokens` tokens."""
    return {"model": model, "prompt": "the day", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}


def start_long_answer(url: str, ask) -> threading.Thread:
    """Run `ask` (which posts `long_answer`) in a thread; return once the server is decoding it."""
    runner = threading.Thread(target=ask)
    started = time.monotonic()
    runner.start()
    while httpx.get(f"{url}/health", timeout=30).json()["running"] == 0:
        assert time.monotonic() - started < 30
        time.sleep(0.01)
    return runner


def timed_post(url: str, body: dict, timeout: float = 30) -> float:
    """Seconds until a 200 answer to `body`."""
    start = time.monotonic()
    response = post(url, body, timeout=timeout)
    assert response.status_code == 200, response.text
    return time.monotonic() - start


# -- 3. a client hanging up on a plain (not streamed) request ---------------------------------------------------
def test_a_client_hanging_up_stops_its_generation(hardened, long_llama):
    url = hardened[G]
    # 8 answers of 1000 tokens: two full batches of 4 at max batch 4, many seconds of work for nobody
    long = {"model": long_llama.name, "prompt": "the day", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "n": 8}
    with pytest.raises(httpx.ReadTimeout):
        post(f"{url}{COMPLETIONS}", long, timeout=0.5)  # the client gives up and closes the connection
    hung_up = time.monotonic()
    while (health := httpx.get(f"{url}/health", timeout=30).json())["running"] or health["waiting"]:
        assert time.monotonic() - hung_up < 1.5, f"still generating for a client that left: {health}"
        time.sleep(0.05)
    answer = post(f"{url}{COMPLETIONS}", {"model": long_llama.name, "prompt": "a chair", "max_tokens": 4,
                                          "temperature": 0}, timeout=10)
    assert answer.status_code == 200 and time.monotonic() - hung_up < 3


# -- 4. a body shorter than its Content-Length --------------------------------------------------------------------
def test_a_body_shorter_than_its_content_length_gets_a_408_and_the_connection_closed(hardened):
    host, port = hardened[G].removeprefix("http://").split(":")
    head = f"POST {COMPLETIONS} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    stalled = [head.encode() + b'Content-Length: 100\r\n\r\n{"model": ',  # 10 of the 100 bytes announced
               head.encode() + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n']  # a chunked body never ended
    connections = [socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT_S + 5) for _ in stalled]
    try:
        for connection, request in zip(connections, stalled, strict=True):
            connection.sendall(request)
        sent = time.monotonic()
        assert httpx.get(f"{hardened[G]}/health", timeout=5).status_code == 200  # others are answered meanwhile
        for connection in connections:
            answer = b""
            while chunk := connection.recv(65536):  # until the server closes the connection
                answer += chunk
            waited = time.monotonic() - sent
            status, _, body = answer.partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 408"), answer
            assert json.loads(body)["error"]["code"] == "request_timeout"
            assert BODY_TIMEOUT_S - 0.1 < waited < BODY_TIMEOUT_S + 3
    finally:
        for connection in connections:
            connection.close()


# -- 5. DNS rebinding: the Host header --------------------------------------------------------------------------
def test_a_foreign_host_is_refused_on_every_route(hardened, long_llama, tiny_bert, tiny_classifier):
    routes = [(G, "GET", "/health", None), (G, "GET", "/v1/models", None),
              (G, "POST", CHAT, {"model": long_llama.name, "messages": USER}),
              (G, "POST", COMPLETIONS, {"model": long_llama.name, "prompt": "a day"}),
              (G, "GET", "/v1/no-such-route", None),
              (E, "POST", EMBEDDINGS, {"model": tiny_bert.name, "input": "a day"}),
              (C, "POST", CLASSIFY, {"model": tiny_classifier.name, "input": "a day"})]
    for server, method, path, body in routes:
        response = httpx.request(method, hardened[server] + path, json=body, timeout=30, headers={
            "Host": "evil.example", "Authorization": f"Bearer {API_KEY}"})
        error = openai_error(response, 400)
        assert error["code"] == "invalid_host" and "evil.example" in error["message"], (method, path)


def test_only_loopback_names_and_ip_addresses_are_answered_by_default(hardened):
    port = hardened[G].rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", f"LocalHost.:{port}",
                 f"10.1.2.3:{port}"):
        assert httpx.get(f"{hardened[G]}/health", headers={"Host": host}, timeout=30).status_code == 200, host
    for host in (f"myname:{port}", "localhost.evil.example", f"127.0.0.1.nip.io:{port}"):
        assert openai_error(httpx.get(f"{hardened[G]}/v1/models", headers={"Host": host}, timeout=30),
                            400)["code"] == "invalid_host", host


def served_in_process(monkeypatch, argv: list[str]) -> tuple[int, dict]:
    """`tunelab serve ARGV` run in this process up to its HTTP server, which is replaced: the exit code and what
    uvicorn would have been given."""
    given: dict = {}
    monkeypatch.setattr(serve_app, "run_http", lambda app, engine, **settings: given.update(app=app, **settings))
    return main(["serve", *argv, "--port", str(free_port())]), given


def test_allowed_hosts_and_the_api_key_file_are_honoured(monkeypatch, long_llama, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"  {API_KEY}  \nsecond line ignored\n", encoding="utf-8")
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    code, given = served_in_process(monkeypatch, [str(long_llama), "--allowed-hosts", "myname",
                                                  "--allowed-hosts", "other.example,Third.Example",
                                                  "--api-key-file", str(key_file)])
    assert code == 0
    assert given["timeout_keep_alive"] > 0 and given["limit_concurrency"] > 0  # idle and piled-up connections
    key = {"Authorization": f"bearer {API_KEY}"}
    with TestClient(given["app"], base_url="http://myname:8000") as app:
        assert app.get("/health", headers=key).status_code == 200
        for host in ("myname", "other.example:8000", "third.example", "localhost:8000"):
            assert app.get("/v1/models", headers={**key, "Host": host}).status_code == 200, host
        assert app.get("/v1/models", headers={**key, "Host": "evil.example"}).json()["error"]["code"] == \
            "invalid_host"
        assert app.get("/v1/models", headers={"Host": "myname"}).status_code == 401  # the key from the file rules
    code, given = served_in_process(monkeypatch, [str(long_llama), "--allowed-hosts", "*"])
    with TestClient(given["app"], base_url="http://evil.example") as app:  # '*' turns the check off
        assert code == 0 and app.get("/health").status_code == 200


# -- 6. strict types, unsupported parameters, the key -----------------------------------------------------------
STRICT_CASES = [  # (id, server, path, extra fields, param)
    ("max_tokens a string", G, COMPLETIONS, {"max_tokens": "16"}, "max_tokens"),
    ("max_tokens a float", G, COMPLETIONS, {"max_tokens": 16.0}, "max_tokens"),
    ("n a boolean", G, COMPLETIONS, {"n": True}, "n"),
    ("seed a string", G, COMPLETIONS, {"seed": "7"}, "seed"),
    ("temperature a string number", G, COMPLETIONS, {"temperature": "0.5"}, "temperature"),
    ("temperature a boolean", G, COMPLETIONS, {"temperature": False}, "temperature"),
    ("stream an integer", G, COMPLETIONS, {"stream": 0}, "stream"),
    ("ignore_eos a string", G, COMPLETIONS, {"ignore_eos": "true"}, "ignore_eos"),
    ("top_k a boolean", G, COMPLETIONS, {"top_k": True}, "top_k"),
    ("classify top_k a boolean", C, CLASSIFY, {"top_k": True}, "top_k"),
    ("classify top_k a string", C, CLASSIFY, {"top_k": "2"}, "top_k"),
]
UNSUPPORTED_CASES = [  # (id, path, extra fields, param)
    ("logprobs", CHAT, {"logprobs": True}, "logprobs"),
    ("top_logprobs", CHAT, {"top_logprobs": 3}, "top_logprobs"),
    ("tools", CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("tool_choice", CHAT, {"tool_choice": "auto"}, "tool_choice"),
    ("functions", CHAT, {"functions": [{"name": "f"}]}, "functions"),
    ("function_call", CHAT, {"function_call": "auto"}, "function_call"),
    ("json response_format", CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    ("logit_bias", CHAT, {"logit_bias": {"5": 100}}, "logit_bias"),
    ("presence_penalty", CHAT, {"presence_penalty": 0.5}, "presence_penalty"),
    ("frequency_penalty", COMPLETIONS, {"frequency_penalty": -1}, "frequency_penalty"),
    ("completion logprobs", COMPLETIONS, {"logprobs": 2}, "logprobs"),
    ("echo", COMPLETIONS, {"echo": True}, "echo"),
    ("best_of", COMPLETIONS, {"best_of": 3}, "best_of"),
    ("suffix", COMPLETIONS, {"suffix": " the end"}, "suffix"),
]


def sample_body(path: str, model: str) -> dict:
    """A valid request to `path`."""
    if path == CLASSIFY:
        return {"model": model, "input": ["a day"]}
    return {"model": model, **({"messages": USER} if path == CHAT else {"prompt": "a day"}), "max_tokens": 2}


@pytest.mark.parametrize(("server", "path", "extra", "param"), [case[1:] for case in STRICT_CASES],
                         ids=[case[0] for case in STRICT_CASES])
def test_lax_types_are_refused_naming_the_field(hardened, request, server, path, extra, param):
    body = sample_body(path, request.getfixturevalue(SERVED[server]).name)
    assert openai_error(post(hardened[server] + path, {**body, **extra}), 400)["param"] == param


@pytest.mark.parametrize(("path", "extra", "param"), [case[1:] for case in UNSUPPORTED_CASES],
                         ids=[case[0] for case in UNSUPPORTED_CASES])
def test_unsupported_openai_parameters_are_refused_naming_them(hardened, long_llama, path, extra, param):
    error = openai_error(post(hardened[G] + path, {**sample_body(path, long_llama.name), **extra}), 400)
    assert error["param"] == param and error["code"] == "unsupported_parameter" and "not supported" in \
        error["message"]


def test_neutral_values_of_unsupported_parameters_and_harmless_fields_pass(hardened, long_llama):
    openai = client(hardened[G])
    answer = openai.chat.completions.create(
        model=long_llama.name, messages=USER, max_tokens=2, temperature=1, logprobs=False, top_logprobs=0,
        presence_penalty=0, frequency_penalty=0.0, logit_bias={}, response_format={"type": "text"},
        tool_choice="none", user="u-1", extra_body={"metadata": {"a": "b"}, "store": False, "best_of": 1})
    assert answer.choices[0].finish_reason in ("stop", "length")
    completion = openai.completions.create(model=long_llama.name, prompt="a day", max_tokens=2, echo=False,
                                           suffix=None, best_of=1, logprobs=None)
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_top_k_one_samples_the_greedy_answer(hardened, long_llama):
    answers = client(hardened[G]).completions.create(model=long_llama.name, prompt="the window", max_tokens=8,
                                                     temperature=1.5, seed=5, n=3, extra_body={"top_k": 1})
    assert [c.text for c in answers.choices] == [greedy(long_llama, "the window", 8, chat=False)] * 3


def test_the_bearer_scheme_is_case_insensitive(hardened, tiny_bert):
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = post(hardened[E] + EMBEDDINGS, {"model": tiny_bert.name, "input": "a day"},
                        {"Authorization": f"{scheme} {API_KEY}"})
        assert response.status_code == 200, (scheme, response.text)
    assert openai_error(post(hardened[E] + EMBEDDINGS, {"model": tiny_bert.name, "input": "a day"},
                             {"Authorization": f"Basic {API_KEY}"}), 401)["code"] == "invalid_api_key"


def test_a_key_on_the_command_line_gets_a_note_about_ps(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    assert served_in_process(monkeypatch, [str(tmp_path / "missing"), "--api-key", "k1"])[0] == 2
    printed = capsys.readouterr().err
    assert printed.count("visible to other users") == 1 and "TUNELAB_API_KEY" in printed
    assert "--api-key-file" in printed and "k1" not in printed
    monkeypatch.setenv("TUNELAB_API_KEY", "k2")
    assert served_in_process(monkeypatch, [str(tmp_path / "missing")])[0] == 2
    assert "visible to other users" not in capsys.readouterr().err  # the env var is the quiet way
    assert served_in_process(monkeypatch, [str(tmp_path / "missing"), "--api-key-file", str(tmp_path / "none")])[
        0] == 2
    assert "--api-key-file" in capsys.readouterr().err


def test_servers_log_no_traceback_after_all_of_it(hardened):
    for name in (G, E, C):
        assert "Traceback" not in hardened[f"{name}_log"].read_text(), name
