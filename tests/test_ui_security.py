"""Studio's safety on a shared machine, checked against the real `tunelab ui` process with plain HTTP clients:
files only from inside the runs folder, state-changing requests only from the board's own page, loopback bind."""

from __future__ import annotations

import http.client
import json

import psutil
import pytest
from studio import StudioServer, seed_unfinished

from tunelab.cli import build_parser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio-security")
    runs = root / "runs"
    run = runs / "toy-run"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: toy\ntask: classify\nmodel: {name: nowhere}\ndata: {source: nowhere}\n")
    (root / "secret.txt").write_text("not for the board")
    (run / "link-out").symlink_to(root / "secret.txt")
    seed_unfinished(run, runs / "stopped")
    studio = StudioServer(runs)
    yield studio
    studio.close()


def request(server: StudioServer, method: str, path: str, headers: dict | None = None,
            body: dict | None = None) -> tuple[int, bytes]:
    """A raw request: http.client sends the path exactly as given (no ../ clean-up as browsers do)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    payload = json.dumps(body).encode() if body is not None else None
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, response.read()


@pytest.mark.parametrize("path", ["/files/../secret.txt", "/files/..%2fsecret.txt", "/files/%2e%2e/secret.txt",
                                  "/files/toy-run/../../secret.txt", "/files/toy-run/link-out",
                                  "/files//etc/passwd", "/files/%2fetc%2fpasswd", "/files/toy-run/nothing.txt"])
def test_file_urls_outside_the_runs_folder_are_404(server, path):
    status, body = request(server, "GET", path)
    assert status == 404
    assert b"not for the board" not in body and b"root:" not in body


@pytest.mark.parametrize("path", ["/api/run?name=..", "/api/run?name=../..", "/api/run?name=%2Fetc",
                                  "/api/form/values?kind=run&name=.."])
def test_run_names_outside_the_runs_folder_are_refused(server, path):
    status, _ = request(server, "GET", path)
    assert status in (400, 404)


def test_files_inside_the_runs_folder_are_served_sandboxed(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", "/files/toy-run/recipe.yaml")
    response = connection.getresponse()
    assert response.status == 200 and b"task: classify" in response.read()
    assert response.getheader("Content-Security-Policy").startswith("sandbox")  # a run's HTML runs no scripts


def test_pages_may_load_only_from_the_board(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", "/")
    response = connection.getresponse()
    assert response.status == 200 and b"<table id=\"runs\">" in response.read()
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")


@pytest.mark.parametrize("endpoint", ["/api/start", "/api/stop", "/api/resume"])
@pytest.mark.parametrize(("headers", "refused_with"), [
    ({}, 403),  # no Origin at all (a script, or an old page)
    ({"Origin": "http://evil.example"}, 403),  # another site's page posting to the board
    # DNS rebinding: a Host that is not the board's name is refused before any route, by the Host allow-list
    ({"Origin": "http://evil.example:{port}", "Host": "evil.example:{port}"}, 400),
    ({"Origin": "http://127.0.0.1:{port}", "Host": "evil.example:{port}"}, 400),
    ({"Origin": "http://127.0.0.1:1", "Host": "127.0.0.1:{port}"}, 403),  # another local port's page
], ids=["no-origin", "foreign-origin", "rebinding", "foreign-host", "other-port"])
def test_state_changing_requests_from_elsewhere_are_refused(server, endpoint, headers, refused_with):
    headers = {key: value.format(port=server.port) for key, value in headers.items()}
    body = {"values": {"name": "x"}} if endpoint == "/api/start" else {"run": "stopped"}
    status, _ = request(server, "POST", endpoint, headers, body)
    assert status == refused_with
    assert server.get_json("/api/runs")["jobs"] == {"current": None, "queued": [], "ended": []}


def test_the_boards_own_origin_gets_past_the_check(server):
    own = {"Origin": f"http://127.0.0.1:{server.port}", "Host": f"127.0.0.1:{server.port}"}
    status, body = request(server, "POST", "/api/stop", own, {"run": "stopped"})
    assert status == 400 and b"not running or queued" in body  # refused for what it asks, not where it came from
    status, body = request(server, "POST", "/api/start", own, {"values": {"name": "x", "task": "classify"}})
    result = json.loads(body)
    assert status == 200 and result["ok"] is False and result["field"] == "model.name"


def test_the_default_bind_address_is_loopback(server):
    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    listening = [c.laddr for c in psutil.Process(server.process.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" and address.port == server.port for address in listening)
