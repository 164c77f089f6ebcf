"""The HTTP app of `tunelab serve`: thin routes between the protocol (protocol.py) and the engine (engine.py).

Every failure a client can cause ends as one `APIError`, written by one handler as OpenAI's error object with a
4xx status; FastAPI's validation errors become 400s that name the field. Two guards stand in front of the app:
`HostAllowList` (tunelab.hosts) answers only a Host header that names this machine (DNS rebinding), then `Guard`
checks the API key, the body size and how fast the body arrives, before a byte of the body is parsed. Start-up
and shut-down of the batching worker live in the lifespan block.

What a slow or absent client can hold: a body must arrive whole within TUNELAB_SERVE_BODY_TIMEOUT seconds (408
and the connection closed otherwise), an idle keep-alive connection is closed after KEEP_ALIVE_S, at most
MAX_CONNECTIONS connections are served at once (uvicorn answers 503 beyond), and a non-streaming request whose
client hangs up is cancelled at once (a task watches for `http.disconnect` while the answer is collected).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tunelab.errors import TunelabError
from tunelab.generation.weights import AUTO, auto_format
from tunelab.hosts import HostAllowList, allowed_names, is_loopback
from tunelab.serve.engine import Choice, GenerationEngine, load_engine
from tunelab.serve.protocol import (
    BODY_TIMEOUT_S,
    MAX_BODY_BYTES,
    APIError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    Sampling,
    ScoreRequest,
    chat_chunk,
    chat_response,
    classify_response,
    completion_chunk,
    completion_response,
    embedding_response,
    model_list,
    new_id,
    score_response,
    usage_chunk,
)

ENDPOINTS = {"generate": ("/v1/chat/completions", "/v1/completions"), "embed": ("/v1/embeddings",),
             "classify": ("/v1/classify",), "score": ("/v1/score",)}
UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}
KIND_NAMES = {"generate": "a text generator", "embed": "an encoder", "classify": "a classifier",
              "score": "a reward model"}
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default, set here on purpose)
MAX_CONNECTIONS = 512  # connections and requests in flight; beyond, uvicorn answers 503 instead of piling up


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Guard:
    """ASGI middleware in front of the app: the API key (when set), then the body: its size (413 over the limit)
    and its pace (408 when it has not arrived whole within `body_timeout` seconds).

    Runs before FastAPI reads the body, so an unauthenticated or oversized request costs no parsing. The body is
    read here (at most `max_body` bytes) and handed on whole, so a client that announces 100 bytes and sends 10, or
    trickles a chunked body, holds its connection for `body_timeout` seconds at most instead of for ever.
    """

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY_BYTES,
                 body_timeout: float = BODY_TIMEOUT_S) -> None:
        self.app, self.api_key, self.max_body, self.body_timeout = app, api_key, max_body, body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self.check_key(headers.get(b"authorization"))
        length = headers.get(b"content-length")
        if refusal is None and length is not None and (not length.isdigit() or int(length) > self.max_body):
            refusal = self.too_large()
        if refusal is not None:
            return await error_response(refusal)(scope, receive, send)
        body = await self.read_body(receive)
        if body is None:  # the client left while sending
            return None
        if isinstance(body, APIError):
            # the rest of the body may still be on its way: close the connection rather than read it as a request
            return await error_response(body, {"Connection": "close"})(scope, receive, send)
        return await self.app(scope, replay(body, receive), send)

    async def read_body(self, receive) -> bytes | APIError | None:
        """The whole body within the deadline, or the error to answer; None when the client disconnected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        body = b""
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return APIError(408, f"the request body did not arrive whole within {self.body_timeout:g} s "
                                     f"(Content-Length larger than the body sent?)", None, "request_timeout")
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return self.too_large()
            if not message.get("more_body"):
                return body

    def check_key(self, header: bytes | None) -> APIError | None:
        if self.api_key is None:
            return None
        scheme, _, token = (header or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer":  # RFC 7235: the scheme is case-insensitive
            return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>' (the server was "
                                 "started with an API key)", None, "invalid_api_key")
        if not hmac.compare_digest(token.strip(), self.api_key.encode()):
            return APIError(401, "invalid API key in the Authorization header", None, "invalid_api_key")
        return None

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is over the limit of {self.max_body} bytes; send fewer or shorter "
                             f"texts", None, "request_too_large")


def replay(body: bytes, receive):
    """A receive callable that hands over an already-read body first, then listens on (for disconnects)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def create_app(engine, model_id: str, names: set[str], api_key: str | None = None,
               hosts: frozenset[str] = allowed_names("127.0.0.1"), body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The app serving `engine` under the model id `model_id` (requests may name any of `names`), answering the
    Host names `hosts` (tunelab.hosts.allowed_names)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="tunelab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, body_timeout=body_timeout)
    # added last, so it runs first: a page on a foreign name learns nothing, not even whether a key is needed
    app.add_middleware(HostAllowList, names=hosts,
                       refuse=lambda message: error_response(APIError(400, message, None, "invalid_host")))

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            routes = ", ".join(("GET /health", "GET /v1/models", *(f"POST {p}" for p in ENDPOINTS[engine.kind])))
            return error_response(APIError(404, f"no endpoint {request.method} {request.url.path}; this server "
                                                f"has {routes}", None, "unknown_url"))
        if error.status_code == 405:
            return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                           "method_not_allowed"))
        return error_response(APIError(error.status_code, str(error.detail), None, None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}", None, "internal_error"))

    def check(request_model: str, kind: str, path: str) -> None:
        """The request names this server's model, and the model does what the endpoint needs."""
        if request_model not in names:
            raise APIError(404, f"model '{request_model}' is not served here; this server serves '{model_id}'",
                           "model", "model_not_found")
        if engine.kind != kind:
            raise APIError(400, f"model '{model_id}' is {KIND_NAMES[engine.kind]}: it answers "
                                f"{' and '.join(ENDPOINTS[engine.kind])}, not {path}", "model", "wrong_endpoint")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "kind": engine.kind, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return model_list(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check(body.model, "generate", "/v1/chat/completions")
        prompt = engine.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        return await generate(engine, request, body, prompt, model_id, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body.model, "generate", "/v1/completions")
        return await generate(engine, request, body, engine.text_prompt(body.prompt), model_id, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        check(body.model, "embed", "/v1/embeddings")
        vectors, tokens = await run_in_threadpool(engine.embed, body.input)
        return embedding_response(model_id, vectors, tokens, body.encoding_format)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        check(body.model, "classify", "/v1/classify")
        rows, tokens = await run_in_threadpool(engine.classify, body.input, body.top_k)
        return classify_response(model_id, rows, tokens)

    @app.post("/v1/score")
    async def score(body: ScoreRequest) -> dict:
        check(body.model, "score", "/v1/score")
        scores, tokens = await run_in_threadpool(engine.score, *body.pairs())
        return score_response(model_id, scores, tokens)

    return app


def validation_error(error: RequestValidationError) -> APIError:
    """FastAPI/pydantic's first complaint as a 400 that names the field (`messages.0.role`) and what was wrong.

    A union (`str | list[str]`) fails once per branch; a complaint about a value (a lone surrogate in `input.1`)
    says more than the branch whose type did not match (`input` is not a string), so it comes first."""
    errors = error.errors()
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    # pydantic names the branch of a union it tried (`content.str`, `input.list[str]`): the field is what is left
    path = [str(part) for part in first.get("loc", ()) if part != "body" and str(part) not in UNION_BRANCHES
            and not any(mark in str(part) for mark in "[-")]
    param = ".".join(path) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON", None, "invalid_json")
    if param is None:
        return APIError(400, "the request body must be a JSON object with the endpoint's fields", None,
                        "invalid_body")
    if kind == "missing":
        return APIError(400, f"field '{param}' is required", param, "missing_field")
    if kind == "unsupported":
        return APIError(400, str(first.get("msg")), param, "unsupported_parameter")
    got = json.dumps(first.get("input"), default=str)
    got = got if len(got) <= 60 else got[:59] + "…"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return APIError(400, f"field '{param}': {message} (got {got})", param, "invalid_value")


async def generate(engine: GenerationEngine, request: Request, body: Sampling, prompt: list[int], model_id: str,
                   chat: bool):
    """Queue the request's choices; stream them as server-sent events, or wait for them and answer once."""
    choices = engine.submit(prompt, max_tokens=body.token_budget(), temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, stops=body.stop, seed=body.seed, n=body.n, ignore_eos=body.ignore_eos)
    request_id = new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(stream(choices, request_id, model_id, len(prompt), chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        answers = await unless_client_leaves(request, collect_all(choices))
    finally:
        for choice in choices:
            choice.cancel()  # no-op for finished ones; frees the rest when the client has gone
    completion_tokens = sum(len(choice.tokens) for choice in choices)
    build = chat_response if chat else completion_response
    return build(request_id, model_id, answers, len(prompt), completion_tokens)


async def unless_client_leaves(request: Request, work):
    """`work`'s result; when the client hangs up first, `work` is cancelled and a 499 raised (nobody reads it).

    The hang-up is watched for concurrently: polling between tokens missed it while tokens kept coming, so a
    long answer ran to its end for nobody and held its batch slot."""
    working, watching = asyncio.ensure_future(work), asyncio.ensure_future(client_left(request))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        working.cancel()  # no-op when done
    if working.done() and not working.cancelled():
        return working.result()
    raise APIError(499, "the client closed the connection", None, "client_closed")


async def client_left(request: Request) -> None:
    """Returns when the client disconnects (the body was read already: receive now only reports the hang-up)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_all(choices: list[Choice]) -> list[tuple[str, str]]:
    return [await collect(choice) for choice in choices]


async def collect(choice: Choice) -> tuple[str, str]:
    """(text, finish_reason) of a choice."""
    text = ""
    while True:
        event = await choice.events.get()
        if event[0] == "text":
            text += event[1]
        elif event[0] == "done":
            return text, event[1]
        else:
            raise APIError(500, event[1], None, "generation_failed")


async def stream(choices: list[Choice], request_id: str, model_id: str, prompt_tokens: int, chat: bool,
                 include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of text, a last chunk with the finish reason per choice, then
    `data: [DONE]`. When the client disconnects this generator is closed, and `finally` cancels its choices."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    try:
        if chat:
            for index in range(len(choices)):
                yield sse(chat_chunk(request_id, model_id, index, {"role": "assistant", "content": ""}, None))
        for index, choice in enumerate(choices):
            while True:
                event = await choice.events.get()
                if event[0] == "error":
                    yield sse(APIError(500, event[1], None, "generation_failed").body())
                    return
                text, reason = (event[1], None) if event[0] == "text" else ("", event[1])
                if chat:
                    delta = {"content": text} if text else {}
                    yield sse(chat_chunk(request_id, model_id, index, delta, reason))
                else:
                    yield sse(completion_chunk(request_id, model_id, index, text, reason))
                if reason is not None:
                    break
        if include_usage:
            yield sse(usage_chunk(request_id, model_id, kind, prompt_tokens, sum(len(c.tokens) for c in choices)))
        yield "data: [DONE]\n\n"
    finally:
        for choice in choices:
            choice.cancel()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning printed when the server is reachable from other machines without a key."""
    if is_loopback(host) or api_key:
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this machine can use the model; "
            f"set --api-key or TUNELAB_API_KEY, or bind 127.0.0.1")


def check_port_free(host: str, port: int) -> None:
    """Say so in one line, before loading the model, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise TunelabError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or "
                               f"--host") from None


def choose_api_key(flag: str | None, key_file: str | None) -> str | None:
    """The API key from --api-key, --api-key-file (its first line) or env TUNELAB_API_KEY, in that order; a key
    given on the command line gets one note on stderr, since other users of the machine see it in `ps`."""
    if flag and key_file:
        raise TunelabError("give the API key once: --api-key or --api-key-file, not both")
    if flag:
        print("note: a key given with --api-key is visible to other users of this machine in `ps`; prefer env "
              "TUNELAB_API_KEY or --api-key-file PATH", file=sys.stderr)
        return flag
    if key_file:
        try:
            lines = Path(key_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TunelabError(f"--api-key-file '{key_file}' cannot be read ({exc.__class__.__name__}); give a "
                               f"readable text file whose first line is the key") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise TunelabError(f"--api-key-file '{key_file}' has no key on its first line; write the key there")
        return key
    return os.environ.get("TUNELAB_API_KEY") or None


def body_timeout_from_env() -> float:
    """TUNELAB_SERVE_BODY_TIMEOUT (seconds), else BODY_TIMEOUT_S."""
    value = os.environ.get("TUNELAB_SERVE_BODY_TIMEOUT", "").strip()
    if not value:
        return BODY_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 3600:
        raise TunelabError(f"TUNELAB_SERVE_BODY_TIMEOUT='{value}' is not a number of seconds between 0 and 3600; "
                           f"unset it for the default of {BODY_TIMEOUT_S:g}")
    return seconds


def serve(model: str, host: str, port: int, api_key: str | None, max_batch: int, dtype: str = "auto",
          allowed_hosts: Iterable[str] = (), compile_steps: bool = False) -> int:
    """Load MODEL and serve it until interrupted."""
    if compile_steps and dtype == "bfloat16":
        raise TunelabError("--compile runs float32 and int8 weights; bfloat16's packed weights cannot be compiled: "
                           "drop --compile or --dtype bfloat16")
    warning = bind_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr)
    body_timeout = body_timeout_from_env()
    hosts = allowed_names(host, allowed_hosts)
    check_port_free(host, port)
    engine = load_engine(model, max_batch)
    if dtype == AUTO:
        engine = auto_weights(engine, model, max_batch, compile_steps)
    elif dtype != "float32":
        if engine.kind != "generate":
            raise TunelabError(f"--dtype {dtype} applies to text generators; '{model}' is {KIND_NAMES[engine.kind]}")
        engine.use_weights(dtype)
    if compile_steps:
        if engine.kind != "generate":
            raise TunelabError(f"--compile applies to text generators; '{model}' is {KIND_NAMES[engine.kind]}")
        engine.compile_steps()
    model_id = model if "/" not in model.rstrip("/") else model.rstrip("/").rsplit("/", 1)[1]
    app = create_app(engine, model_id, {model, model_id}, api_key, hosts, body_timeout)
    print(f"tunelab: serving '{model_id}' ({KIND_NAMES[engine.kind]}) on http://{host}:{port} — endpoints "
          f"{', '.join(ENDPOINTS[engine.kind])}; API key {'required' if api_key else 'not required'}",
          file=sys.stderr, flush=True)
    run_http(app, engine, host=host, port=port, log_level="warning", access_log=False,
             timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONNECTIONS)
    return 0


def auto_weights(engine, model: str, max_batch: int, compile_steps: bool):
    """`--dtype auto`: a text generator's weights in the fastest format this machine runs it in (auto_format), said
    in one line; where that format cannot run this model, it is loaded again and served in float32."""
    if engine.kind != "generate":
        return engine
    name, why = auto_format(engine.model)
    if name == "bfloat16" and compile_steps:
        name, why = "float32", "--compile"
    if name != "float32":
        try:
            engine.use_weights(name)
        except TunelabError as exc:
            name, why = "float32", str(exc).split(";")[0]
            engine = load_engine(model, max_batch)
    exact = " (--dtype float32: the same greedy answer in any batch)" if name != "float32" else ""
    print(f"tunelab: {name} weights, chosen by --dtype auto: {why}{exact}", file=sys.stderr, flush=True)
    return engine


def run_http(app: FastAPI, engine, **settings) -> None:
    """Serve `app` with uvicorn (`settings` are its own) until SIGINT or SIGTERM; a text generator's decoding loop
    runs in this thread meanwhile (`decode_here`)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **settings))
    if isinstance(engine, GenerationEngine):
        decode_here(server, engine)
    else:
        server.run()


def decode_here(server, engine: GenerationEngine) -> None:
    """HTTP in a thread, the decoding loop in this one, the thread that loaded the model (Batcher.here says why);
    SIGINT and SIGTERM shut both down as uvicorn alone would."""
    import signal
    import threading

    batcher = engine.batcher
    batcher.here = True

    def http() -> None:
        try:
            server.run()
        finally:
            batcher.stopping.set()  # the server ended (or never started): so does decoding

    def shut_down(*_) -> None:
        server.should_exit = True

    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, shut_down)
    web = threading.Thread(target=http, name="tunelab-http", daemon=True)
    web.start()
    batcher.work()
    web.join(timeout=30)
    if not server.started:
        raise TunelabError(f"the HTTP server could not start on {server.config.host}:{server.config.port} (its log "
                           f"above says why)")
