"""`tunelab serve` for real: one server subprocess per model kind on a free loopback port, driven by the official
`openai` client (and httpx for the raw, broken requests a client library would refuse to send)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import seeded_random_weights
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForSequenceClassification

import tunelab
from tunelab import api
from tunelab.cli import build_parser, main
from tunelab.errors import TunelabError
from tunelab.generation.weights import Int8Linear, use_format
from tunelab.models.precision import bf16_supported
from tunelab.serve import app
from tunelab.serve.app import bind_warning
from tunelab.serve.engine import GenerationEngine, load_engine

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}it was{% endif %}")
API_KEY = "test-key-123"
KEY_HEADER = {"Authorization": f"Bearer {API_KEY}"}
LABELS = ["neg", "neu", "pos"]
TEXTS = ["this day was awful", "a lovely chair", "the window is very poor", "it was fine"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama with a simple chat template in its tokenizer."""
    folder = tmp_path_factory.mktemp("chat-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_classifier(tiny_bert, tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier folder with three named labels (random weights)."""
    folder = tmp_path_factory.mktemp("tiny-classifier")
    config = BertConfig.from_pretrained(tiny_bert, num_labels=3, id2label=dict(enumerate(LABELS)),
                                        label2id={label: i for i, label in enumerate(LABELS)})
    model = seeded_random_weights(BertForSequenceClassification, config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def server_env() -> dict:
    """The environment a test's server process runs in: this tunelab, one thread, offline, no API key from outside."""
    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("TUNELAB_API_KEY", None)
    return env


@pytest.fixture(scope="module")
def servers(chat_llama, tiny_bert, tiny_classifier, tmp_path_factory):
    """Three real servers started side by side: generation (max batch 4, float32: the answers are compared with
    fp32 `generate`'s), embeddings (API key), classify."""
    env = server_env()
    logs = tmp_path_factory.mktemp("server-logs")
    started = {}
    for name, model, extra in [("generate", chat_llama, ["--max-batch", "4", "--dtype", "float32"]),
                               ("embed", tiny_bert, ["--api-key", API_KEY]),
                               ("classify", tiny_classifier, [])]:
        port = free_port()
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed at teardown
        process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(model), "--port", str(port),
                                    *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
        started[name] = (process, f"http://127.0.0.1:{port}", log, logs / f"{name}.log")
    try:
        for name, (process, url, _, log_path) in started.items():
            wait_until_healthy(process, url, log_path, API_KEY if name == "embed" else None)
        yield {name: url for name, (_, url, _, _) in started.items()} | {
            f"{name}_log": log_path for name, (_, _, _, log_path) in started.items()}
    finally:
        for process, _, log, _ in started.values():
            process.terminate()
            process.wait(timeout=20)
            log.close()


def wait_until_healthy(process: subprocess.Popen, url: str, log: Path, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"server not healthy after 90 s: {log.read_text()[-2000:]}")


def client(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def greedy(folder: Path, text: str, max_new_tokens: int, chat: bool, int8: bool = False) -> str:
    """The plain-transformers greedy answer, one prompt at a time (what the server must reproduce), with the linear
    layers in int8 when asked."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if int8:
        use_format(model, "int8")
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_completion_equals_plain_transformers_greedy(servers, chat_llama):
    answer = client(servers["generate"]).chat.completions.create(
        model=chat_llama.name, messages=[{"role": "user", "content": "the day was good"}], max_tokens=6,
        temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy(chat_llama, "the day was good", 6, chat=True)
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


@contextlib.contextmanager
def one_server(folder: Path, log: Path, *flags: str) -> Iterator[str]:
    """A generation server on its own port with extra flags, for the life of the block: its URL."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(folder), "--port", str(port),
                                    *flags], env=server_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", log, None)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        code = process.wait(timeout=20)
    assert code == 0, log.read_text()[-2000:]  # SIGTERM ends the HTTP thread and the decoding loop, and nothing else


@pytest.mark.skipif(not bf16_supported(), reason="int8 weights decode with bf16 arithmetic: this CPU has none")
@pytest.mark.parametrize("flags", [[], ["--dtype", "int8"]], ids=["auto", "int8"])
def test_an_int8_server_answers_as_int8_generate_does(servers, chat_llama, tmp_path, flags):
    with one_server(chat_llama, tmp_path / "int8.log", *flags) as url:
        assert httpx.get(f"{url}/health").json()["weights"] == "int8"
        assert httpx.get(f"{servers['generate']}/health").json()["weights"] == "float32"
        for text in ("the day was good", "a lovely chair"):
            answer = client(url).chat.completions.create(
                model=chat_llama.name, messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0)
            assert answer.choices[0].message.content == greedy(chat_llama, text, 8, chat=True, int8=True)
    said = (tmp_path / "int8.log").read_text()
    assert ("int8 weights, chosen by --dtype auto: this CPU runs bf16 natively" in said) == (not flags)


def test_auto_weights_serve_a_fresh_float32_model_where_the_chosen_format_fails(chat_llama, monkeypatch, capsys):
    convert = GenerationEngine.use_weights

    def converted_then_refused(self, name):  # as use_format's check does: the layers are int8 when it refuses
        try:
            convert(self, name)
        finally:
            raise TunelabError("int8 weights do not run with LlamaForCausalLM (TypeError: x); use float32")

    monkeypatch.setattr(app, "auto_format", lambda model: ("int8", "this CPU runs bf16 natively"))
    monkeypatch.setattr(GenerationEngine, "use_weights", converted_then_refused)
    engine = app.auto_weights(load_engine(str(chat_llama), 4), str(chat_llama), 4, compile_steps=False)
    assert engine.weights == "float32"
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    assert not any(isinstance(m, Int8Linear) for m in engine.model.modules())
    assert "float32 weights, chosen by --dtype auto: int8 weights do not run with LlamaForCausalLM (TypeError: x)\n" \
        in capsys.readouterr().err


def test_a_compiled_server_answers_alone_and_together_as_generate_does(chat_llama, tmp_path):
    texts = ["the day was good", "a lovely chair", "the window"]
    with one_server(chat_llama, tmp_path / "compiled.log", "--compile", "--dtype", "float32") as url:
        assert "compiling the decode step" in (tmp_path / "compiled.log").read_text()
        alone = client(url).chat.completions.create(
            model=chat_llama.name, messages=[{"role": "user", "content": texts[0]}], max_tokens=8, temperature=0)
        assert alone.choices[0].message.content == greedy(chat_llama, texts[0], 8, chat=True)
        with ThreadPoolExecutor(3) as pool:  # sent at once: the first may start alone, the others join it
            together = list(pool.map(lambda text: client(url).chat.completions.create(
                model=chat_llama.name, messages=[{"role": "user", "content": text}], max_tokens=12, temperature=0,
            ).choices[0].message.content, texts))
        assert together == [greedy(chat_llama, text, 12, chat=True) for text in texts]


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "int8"], "error: --dtype int8 applies to text generators"),
    (["--compile"], "error: --compile applies to text generators; "),
])
def test_a_format_or_compiling_for_a_non_generator_is_refused_in_one_line(tiny_classifier, capsys, flags, message):
    assert main(["serve", str(tiny_classifier), *flags, "--port", str(free_port())]) == 2
    assert message in capsys.readouterr().err


def test_compiling_packed_bf16_weights_is_refused_in_one_line(chat_llama, capsys):
    assert main(["serve", str(chat_llama), "--dtype", "bfloat16", "--compile", "--port", str(free_port())]) == 2
    assert "error: --compile runs float32 and int8 weights; bfloat16's packed weights cannot be compiled: drop " \
           "--compile or --dtype bfloat16" in capsys.readouterr().err


def test_streamed_chunks_concatenate_to_the_greedy_answer(servers, chat_llama):
    openai = client(servers["generate"])
    messages = [{"role": "user", "content": "a lovely window"}]
    whole = openai.chat.completions.create(model=chat_llama.name, messages=messages, max_tokens=12, temperature=0)
    chunks = list(openai.chat.completions.create(model=chat_llama.name, messages=messages, max_tokens=12,
                                                 temperature=0, stream=True))
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed, not one piece
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completions_continue_the_raw_prompt(servers, chat_llama):
    answer = client(servers["generate"]).completions.create(model=chat_llama.name, prompt="this chair is",
                                                            max_tokens=5, temperature=0)
    assert answer.choices[0].text == greedy(chat_llama, "this chair is", 5, chat=False)
    assert answer.object == "text_completion" and answer.usage.completion_tokens <= 5


def test_seeded_sampling_repeats_and_n_gives_n_choices(servers, chat_llama):
    openai = client(servers["generate"])
    ask = dict(model=chat_llama.name, prompt="the paper", max_tokens=8, temperature=1.0, top_p=0.9, seed=11, n=3)
    first, second = openai.completions.create(**ask), openai.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]


def test_stop_sequence_cuts_the_answer(servers, chat_llama):
    openai = client(servers["generate"])
    full = openai.completions.create(model=chat_llama.name, prompt="a door", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    if len(words) < 3:
        pytest.skip(f"the random model answered too briefly to cut: {full!r}")
    stop = words[2]
    cut = openai.completions.create(model=chat_llama.name, prompt="a door", max_tokens=10, temperature=0,
                                    stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_concurrent_requests_are_batched_and_keep_their_greedy_answers(servers, chat_llama):
    url, prompts = servers["generate"], [f"the {w} was" for w in ["day", "table", "paper", "door", "window",
                                                                     "chair", "day it", "a day"]]
    openai = client(url)
    sequential = [openai.completions.create(model=chat_llama.name, prompt=p, max_tokens=6, temperature=0)
                  .choices[0].text for p in prompts]
    before = httpx.get(f"{url}/health", timeout=60).json()
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = openai.completions.create(model=chat_llama.name, prompt=prompts[i], max_tokens=6,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = httpx.get(f"{url}/health", timeout=60).json()
    assert [answers[i] for i in range(len(prompts))] == sequential
    batches, rows = after["batches"] - before["batches"], after["batched_requests"] - before["batched_requests"]
    assert rows == len(prompts) and batches < rows  # the model saw batches, not one request at a time


def test_embeddings_are_normalised_mean_pooled_sentence_transformers_vectors(servers, tiny_bert):
    from sentence_transformers import SentenceTransformer

    openai = client(servers["embed"], API_KEY)
    answer = openai.embeddings.create(model=tiny_bert.name, input=TEXTS)  # the client asks for base64
    vectors = np.array([row.embedding for row in answer.data])
    as_floats = openai.embeddings.create(model=tiny_bert.name, input=TEXTS, encoding_format="float")
    np.testing.assert_array_equal(vectors, np.array([row.embedding for row in as_floats.data], dtype=np.float32))
    expected = SentenceTransformer(str(tiny_bert), device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert [row.index for row in answer.data] == list(range(len(TEXTS))) and answer.usage.prompt_tokens > 0


def test_classify_gives_the_numbers_of_tunelab_predict(servers, tiny_classifier):
    response = httpx.post(f"{servers['classify']}/v1/classify", json={"model": tiny_classifier.name,
                                                                      "input": TEXTS, "top_k": 3}, timeout=60)
    assert response.status_code == 200
    rows = response.json()["data"]
    expected = api.predict(str(tiny_classifier), TEXTS, top_k=3)
    assert [{k: row[k] for k in ("text", "label", "probability", "top")} for row in rows] == expected
    assert [row["index"] for row in rows] == list(range(len(TEXTS)))
    assert {entry["label"] for entry in rows[0]["top"]} == set(LABELS)


def test_models_and_health_name_the_served_model(servers, chat_llama):
    assert [m.id for m in client(servers["generate"]).models.list().data] == [chat_llama.name]
    health = httpx.get(f"{servers['generate']}/health", timeout=60).json()
    assert health["status"] == "ok" and health["kind"] == "generate"


G, E, C = "generate", "embed", "classify"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "good day"}]
BAD_REQUESTS = [  # (id, server, method, path, json body or raw bytes, headers, status, param)
    ("unknown model", G, "POST", CHAT, {"model": "gpt-4", "messages": USER}, {}, 404, "model"),
    ("no model", G, "POST", CHAT, {"messages": USER}, {}, 400, "model"),
    ("empty messages", G, "POST", CHAT, {"model": "M", "messages": []}, {}, 400, "messages"),
    ("no messages", G, "POST", CHAT, {"model": "M"}, {}, 400, "messages"),
    ("max_tokens over the limit", G, "POST", CHAT, {"model": "M", "messages": USER, "max_tokens": 100_000}, {}, 400,
     "max_tokens"),
    ("max_tokens zero", G, "POST", CHAT, {"model": "M", "messages": USER, "max_tokens": 0}, {}, 400, "max_tokens"),
    ("over the context", G, "POST", CHAT, {"model": "M", "messages": USER, "max_tokens": 1000}, {}, 400,
     "max_tokens"),
    ("temperature a string", G, "POST", CHAT, {"model": "M", "messages": USER, "temperature": "hot"}, {}, 400,
     "temperature"),
    ("temperature too high", G, "POST", CHAT, {"model": "M", "messages": USER, "temperature": 7}, {}, 400,
     "temperature"),
    ("top_p zero", G, "POST", CHAT, {"model": "M", "messages": USER, "top_p": 0}, {}, 400, "top_p"),
    ("n too large", G, "POST", CHAT, {"model": "M", "messages": USER, "n": 100}, {}, 400, "n"),
    ("unknown role", G, "POST", CHAT, {"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, {}, 400,
     "messages.0.role"),
    ("content a number", G, "POST", CHAT, {"model": "M", "messages": [{"role": "user", "content": 5}]}, {}, 400,
     "messages.0.content"),
    ("five stop sequences", G, "POST", CHAT, {"model": "M", "messages": USER, "stop": list("abcde")}, {}, 400,
     "stop"),
    ("stream a list", G, "POST", CHAT, {"model": "M", "messages": USER, "stream": [1]}, {}, 400, "stream"),
    ("negative seed", G, "POST", COMPLETIONS, {"model": "M", "prompt": "a", "seed": -1}, {}, 400, "seed"),
    ("empty prompt", G, "POST", COMPLETIONS, {"model": "M", "prompt": ""}, {}, 400, "prompt"),
    ("two prompts", G, "POST", COMPLETIONS, {"model": "M", "prompt": ["a", "b"]}, {}, 400, "prompt"),
    ("invalid JSON", G, "POST", CHAT, b'{"model": "M", "messages": [', {}, 400, None),
    ("body a list", G, "POST", CHAT, b"[1, 2]", {}, 400, None),
    ("oversized body", G, "POST", COMPLETIONS, b'{"model": "M", "prompt": "' + b"a" * 2_000_000 + b'"}', {}, 413,
     None),
    ("embeddings from a generator", G, "POST", "/v1/embeddings", {"model": "M", "input": "hi"}, {}, 400, "model"),
    ("unknown endpoint", G, "GET", "/v1/engines", None, {}, 404, None),
    ("wrong method", G, "DELETE", "/v1/models", None, {}, 405, None),
    ("chat to a classifier", C, "POST", CHAT, {"model": "M", "messages": USER}, {}, 400, "model"),
    ("classify no texts", C, "POST", "/v1/classify", {"model": "M", "input": []}, {}, 400, "input"),
    ("classify blank text", C, "POST", "/v1/classify", {"model": "M", "input": ["  "]}, {}, 400, "input"),
    ("classify top_k zero", C, "POST", "/v1/classify", {"model": "M", "input": ["hi"], "top_k": 0}, {}, 400,
     "top_k"),
    ("missing API key", E, "POST", "/v1/embeddings", {"model": "M", "input": "hi"}, None, 401, None),
    ("wrong API key", E, "POST", "/v1/embeddings", {"model": "M", "input": "hi"}, {"Authorization": "Bearer nope"},
     401, None),
    ("unknown encoding", E, "POST", "/v1/embeddings", {"model": "M", "input": "hi", "encoding_format": "binary"},
     {}, 400, "encoding_format"),
    ("too many texts", E, "POST", "/v1/embeddings", {"model": "M", "input": ["hi"] * 300}, {}, 400, "input"),
]
SERVED = {G: "chat_llama", E: "tiny_bert", C: "tiny_classifier"}


@pytest.mark.parametrize(("server", "method", "path", "body", "headers", "status", "param"),
                         [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_an_openai_shaped_4xx(servers, request, server, method, path, body, headers, status,
                                               param):
    model = request.getfixturevalue(SERVED[server]).name
    if headers is not None and server == E:
        headers = {"Authorization": f"Bearer {API_KEY}", **headers}
    if isinstance(body, dict):
        body = json.dumps({**body, "model": model} if body.get("model") == "M" else body).encode()
    response = httpx.request(method, servers[server] + path, content=body, headers={
        "Content-Type": "application/json", **(headers or {})}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["param"] == param and error["type"].endswith("_error")


def test_servers_stay_healthy_after_the_bad_requests(servers):
    for name in (G, C):
        assert httpx.get(f"{servers[name]}/health", timeout=60).json()["status"] == "ok"
    assert httpx.get(f"{servers[E]}/health", headers=KEY_HEADER, timeout=60).status_code == 200
    for name in (G, E, C):
        assert "Traceback" not in servers[f"{name}_log"].read_text()


def test_api_key_is_enforced_when_set(servers, tiny_bert):
    with pytest.raises(AuthenticationError):
        client(servers[E], "wrong").embeddings.create(model=tiny_bert.name, input="hi")
    assert httpx.get(f"{servers[E]}/health", timeout=60).status_code == 401
    assert httpx.get(f"{servers[E]}/v1/models", headers=KEY_HEADER, timeout=60).status_code == 200
    assert httpx.get(f"{servers[G]}/health", timeout=60).status_code == 200  # no key set: open (on loopback)


def test_openai_client_raises_the_servers_errors(servers, chat_llama):
    openai = client(servers[G])
    with pytest.raises(NotFoundError, match="not served here"):
        openai.chat.completions.create(model="gpt-4", messages=USER)
    with pytest.raises(BadRequestError, match="max_tokens"):
        openai.chat.completions.create(model=chat_llama.name, messages=USER, max_tokens=5000)


def test_a_client_leaving_mid_stream_frees_its_slot(servers, chat_llama):
    url = servers[G]
    body = {"model": chat_llama.name, "prompt": "the day", "max_tokens": 50, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: {")
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{url}/health", timeout=60).json())["running"] or health["waiting"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    answer = client(url).completions.create(model=chat_llama.name, prompt="the day", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_default_bind_is_loopback_and_an_open_bind_without_key_warns(servers, capsys, tmp_path):
    assert build_parser().parse_args(["serve", "m"]).host == "127.0.0.1"
    assert f"on http://127.0.0.1:{servers[G].rsplit(':', 1)[1]}" in servers["generate_log"].read_text()
    assert bind_warning("127.0.0.1", None) is None and bind_warning("0.0.0.0", "key") is None
    assert main(["serve", str(tmp_path / "missing"), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    printed = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0 without an API key" in printed
    assert "error: MODEL" in printed and "is not a run folder" in printed
