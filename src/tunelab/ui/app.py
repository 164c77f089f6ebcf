"""The board's HTTP app: pages, a JSON API over the runs folder, file links and the playground's streams.

Routes stay thin: reading runs is runs_index.py (and studies, studies.py), launching is launcher.py, the form is
forms.py, trying a model is playground.py, and the Host, token, origin and path checks are security.py (and
tunelab/hosts.py).

Every answer is JSON the pages can show, errors included: a bad request is a 400 naming what is wrong, never a
plain-text 500 (the request's own values are not echoed: they may not even be valid UTF-8).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.errors import TunelabError
from tunelab.hosts import HostAllowList, allowed_names, is_loopback
from tunelab.recipe import GenerateConfig
from tunelab.serve.protocol import Text  # refuses lone UTF-16 surrogates, as serve does
from tunelab.ui import forms
from tunelab.ui.launcher import Launcher
from tunelab.ui.playground import Playground
from tunelab.ui.runs_index import RunsIndex
from tunelab.ui.security import TokenGate, board_token, file_inside, same_origin
from tunelab.ui.studies import StudiesIndex

STATIC = Path(__file__).parent / "static"
# The pages may load only what this server serves (a second line of defence behind having no outside URLs at all).
PAGE_POLICY = ("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'")
# Files from run folders (report.html) render, but run no scripts and get an origin of their own.
FILE_POLICY = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"
PAGES = {"/": "runs.html", "/run": "run.html", "/study": "study.html", "/compare": "compare.html", "/new": "new.html",
         "/playground": "playground.html"}


@dataclass
class Settings:
    """Where the board reads runs and examples, the address it serves (for the Host and origin checks), the other
    names it answers to (--allowed-hosts) and the token every request must carry (None: no token)."""

    runs_dir: Path
    examples_dir: Path
    host: str
    port: int
    allowed_hosts: tuple[str, ...] = ()
    token: str | None = None


class FormValues(BaseModel):
    values: dict[Text, Text]


class RunName(BaseModel):
    run: Text


class PredictRequest(BaseModel):
    run: Text
    text: Text = Field(min_length=1)


class ChatRequest(BaseModel):
    run: Text
    model: Text = "tuned"  # tuned | base
    text: Text = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0, le=100)


def create_app(settings: Settings) -> FastAPI:
    """The app for one runs folder."""
    runs_dir = settings.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    index = RunsIndex(runs_dir)
    studies = StudiesIndex(index)
    launcher = Launcher(runs_dir)
    playground = Playground()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        launcher.start()
        yield
        launcher.close()  # a run the board started is interrupted, so `--resume` can finish it later

    app = FastAPI(title="tunelab studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    names = allowed_names(settings.host, settings.allowed_hosts)
    # Added innermost first: the Host check runs before the token check, and both before any route or static file.
    app.add_middleware(TokenGate, token=settings.token, port=settings.port, pages=frozenset(PAGES),
                       refuse=lambda message: JSONResponse({"error": message}, status_code=401))
    app.add_middleware(HostAllowList, names=names,
                       refuse=lambda message: JSONResponse({"error": message}, status_code=400))

    def from_own_page(request: Request) -> None:
        if not same_origin(request.headers.get("origin"), request.headers.get("host"), names):
            raise HTTPException(403, "refused: state-changing requests must come from the board's own page "
                                     "(Origin and Host must name this server)")

    @app.exception_handler(TunelabError)
    async def tunelab_error(request: Request, exc: TunelabError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": describe_bad_request(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: still JSON, so the page shows it instead of failing to parse a text body.
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the board's console"},
                            status_code=500)

    for route, page in PAGES.items():
        app.add_api_route(route, page_handler(STATIC / page), methods=["GET"], include_in_schema=False)

    @app.get("/api/runs")
    def list_runs() -> dict:
        return {"runs": index.summaries(launcher.active_runs(), launcher.ended, frozenset(launcher.queued_runs())),
                "studies": studies.rows(), "jobs": launcher.state()}

    @app.get("/api/run")
    def run_detail(name: Text) -> dict:
        try:
            return index.detail(name, launcher.active_runs(), launcher.ended, frozenset(launcher.queued_runs()))
        except TunelabError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/study")
    def study_detail(name: Text) -> dict:
        try:
            return studies.detail(name)
        except TunelabError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/files/{relative:path}")
    def run_file(relative: str) -> FileResponse:
        path = file_inside(runs_dir, relative)
        if path is None:
            raise HTTPException(404, "no such file in the runs folder")
        return FileResponse(path, headers={"Content-Security-Policy": FILE_POLICY,
                                           "X-Content-Type-Options": "nosniff"})

    @app.get("/api/form")
    def form() -> dict:
        examples = forms.example_names(settings.examples_dir)
        runs = [row["name"] for row in index.summaries(set(), launcher.ended)]
        return {**forms.form_schema(), "examples": examples, "runs": runs}

    @app.get("/api/form/values")
    def form_values(kind: Text, name: Text) -> dict:
        return {"values": forms.template_values(settings.examples_dir, index, kind, name)}

    @app.post("/api/validate", dependencies=[Depends(from_own_page)])
    def validate(form: FormValues) -> dict:
        return forms.check_form(form.values)[1]

    @app.post("/api/start", dependencies=[Depends(from_own_page)])
    def start(form: FormValues) -> dict:
        recipe, result = forms.check_form(form.values)
        if recipe is None:
            return result  # nothing starts: the page shows the error by its field
        job = launcher.submit_new(recipe)
        return {**result, "job": job.public(), "run": index.name_of(job.run_dir)}

    @app.post("/api/stop", dependencies=[Depends(from_own_page)])
    def stop(body: RunName) -> dict:
        return {"job": launcher.stop(index.resolve(body.run)).public()}

    @app.post("/api/resume", dependencies=[Depends(from_own_page)])
    def resume(body: RunName) -> dict:
        run_dir = index.resolve(body.run)
        if (run_dir / "metrics.json").is_file():
            raise TunelabError(f"run '{body.run}' already finished; there is nothing to resume")
        study = index.study_of(run_dir)
        if study is not None:  # its study runs it again: `tunelab train --resume` would train it outside the study
            raise TunelabError(f"run '{body.run}' belongs to study '{study['name']}'; continue the study with "
                               f"`tunelab tune --resume --output {index.root / study['name']}`")
        return {"job": launcher.submit_resume(run_dir).public()}

    @app.post("/api/predict", dependencies=[Depends(from_own_page)])
    def predict(body: PredictRequest) -> dict:
        return playground.predict(index.resolve(body.run), body.text)

    @app.post("/api/chat", dependencies=[Depends(from_own_page)])
    def chat(body: ChatRequest) -> StreamingResponse:
        settings_ = GenerateConfig(max_new_tokens=body.max_new_tokens, temperature=body.temperature)
        pieces = playground.stream(index.resolve(body.run), body.model, body.text, settings_)
        return StreamingResponse(server_sent_events(pieces), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    return app


def describe_bad_request(exc: RequestValidationError) -> str:
    """The first problem of a request body or query as one line: where, and what is wrong (never the value)."""
    errors = exc.errors()
    if not errors:
        return "bad request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
    message = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    return f"bad request: {where or 'body'}: {message}".encode("utf-8", "replace").decode("utf-8")


def page_handler(path: Path):
    """A route returning one of the static pages."""
    def handler() -> FileResponse:
        return FileResponse(path, media_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY})
    return handler


def server_sent_events(pieces: Iterator[str]) -> Iterator[str]:
    """Each piece as an SSE `data:` event, then `event: done`; an error mid-stream becomes an `error` event."""
    try:
        for piece in pieces:
            if piece:
                yield f"data: {json.dumps({'text': piece})}\n\n"
    except TunelabError as exc:
        yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
        return
    except Exception as exc:  # noqa: BLE001 - the response has started: an error can only be an event now
        yield f"event: error\ndata: {json.dumps({'error': f'generation failed ({type(exc).__name__})'})}\n\n"
        return
    yield "event: done\ndata: {}\n\n"


def default_examples_dir() -> Path:
    """examples/ of the checkout tunelab runs from, else of the current folder."""
    checkout = Path(__file__).resolve().parents[3] / "examples"
    return checkout if checkout.is_dir() else Path("examples")


def check_port_free(host: str, port: int) -> None:
    """A one-line error instead of uvicorn's log when the address is taken (or cannot be bound)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise TunelabError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host") from None


def serve(runs_dir: str, host: str, port: int, allowed_hosts: tuple[str, ...] = (),
          token_file: str | None = None) -> None:
    """Run the board until Ctrl-C (a run it started is interrupted so that it can be resumed)."""
    import uvicorn

    check_port_free(host, port)
    token, origin = board_token(host, token_file)
    settings = Settings(Path(runs_dir), default_examples_dir(), host, port, tuple(allowed_hosts), token)
    app = create_app(settings)
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # a wildcard is no address to open
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"
    if origin == "generated":
        url += f"?token={token}"  # printed once, like Jupyter's: whoever can read this console may use the board
    print(f"tunelab ui: {url} (runs: {settings.runs_dir}); Ctrl-C stops it", flush=True)
    if origin in ("env", "file"):
        print(f"tunelab ui: every request needs the token from {'$TUNELAB_UI_TOKEN' if origin == 'env' else token_file}"
              f" (open {url}?token=TOKEN once)", flush=True)
    if not is_loopback(host):
        print(f"tunelab ui: warning: listening on {host}, which other machines may reach: anyone with the token can "
              f"start runs, read every run folder and run a recipe's code on this machine; prefer the default "
              f"127.0.0.1 with an SSH tunnel", flush=True)
    # An open page keeps connections alive; after a few seconds shutting down does not wait for them any more.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
