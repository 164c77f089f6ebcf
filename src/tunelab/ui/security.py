"""What keeps the board safe on a shared machine, one check per layer:

- every request (pages, static files, API, run files) must name the board in its Host header (tunelab/hosts.py:
  a rebound DNS name is refused, so a web page elsewhere cannot read the board as its own origin);
- on an address other machines can reach, every request must carry the board's token (Jupyter's scheme: printed
  once in the start URL, then kept in an HttpOnly, SameSite=Strict cookie), since no Host or Origin check tells a
  stranger on the network from its user;
- requests that change anything must come from the board's own pages (Origin names the Host it was sent to);
- files are served only from inside the runs folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from tunelab.errors import TunelabError
from tunelab.hosts import host_allowed, is_loopback

TOKEN_ENV = "TUNELAB_UI_TOKEN"
TOKEN_HEADER = "x-tunelab-token"


def board_token(bind_host: str, token_file: str | None = None, environ: dict | None = None) -> tuple[str | None, str]:
    """The token every request must carry, and where it came from ("env", "file", "generated" or "none"):
    TUNELAB_UI_TOKEN, else --token-file, else a fresh random one on an address other machines can reach, else none
    (a loopback board keeps working without one, as before)."""
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV, "").strip():
        return environ[TOKEN_ENV].strip(), "env"
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TunelabError(f"--token-file '{token_file}' cannot be read ({exc}); give a file holding the "
                               f"token") from None
        if not token:
            raise TunelabError(f"--token-file '{token_file}' is empty; write a long random token into it")
        return token, "file"
    if not is_loopback(bind_host):
        return secrets.token_urlsafe(32), "generated"
    return None, "none"


def cookie_name(port: int) -> str:
    """Cookies do not tell ports apart: two boards on one machine each keep their own."""
    return f"tunelab_ui_token_{port}"


def cookie_value(token: str) -> str:
    """What the cookie holds: a digest of the token, so a token with any characters fits a cookie."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison, so response times do not leak how much of a guess was right."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def presented_tokens(scope: dict, port: int) -> tuple[str | None, list[str | None], str | None]:
    """Where a token may come in: (the `?token=` query value, [bearer, X-Tunelab-Token], the cookie)."""
    headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))).get("token")
    bearer = headers.get("authorization", "")
    cookie = SimpleCookie()
    with contextlib.suppress(CookieError):  # a malformed Cookie header carries no token
        cookie.load(headers.get("cookie", ""))
    morsel = cookie.get(cookie_name(port))
    bearer_token = bearer[7:].strip() if bearer.lower().startswith("bearer ") else None
    return query, [bearer_token, headers.get(TOKEN_HEADER)], morsel.value if morsel else None


class TokenGate:
    """ASGI middleware: with a token set, a request without it gets `refuse(message)` (401). A right `?token=`
    sets the cookie; on a page it also redirects to the same URL without the token, so it stays out of the history
    and of links copied from the address bar."""

    def __init__(self, app, token: str | None, port: int, pages: frozenset[str], refuse) -> None:
        self.app, self.token, self.port, self.pages, self.refuse = app, token, port, pages, refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.token is None:
            return await self.app(scope, receive, send)
        query, headers, cookie = presented_tokens(scope, self.port)
        if any(token_matches(given, self.token) for given in headers) or \
                token_matches(cookie, cookie_value(self.token)):
            return await self.app(scope, receive, send)
        if not token_matches(query, self.token):
            return await self.refuse("refused: this board needs its token; open the URL `tunelab ui` printed at start "
                                     "(…/?token=…), or send it as `Authorization: Bearer TOKEN`")(scope, receive, send)
        cookie = f"{cookie_name(self.port)}={cookie_value(self.token)}; Path=/; HttpOnly; SameSite=Strict".encode()
        if scope["method"] == "GET" and scope["path"] in self.pages:
            rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k != "token"]
            location = scope["path"] + (f"?{urlencode(rest)}" if rest else "")
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", location.encode("latin-1")), (b"set-cookie", cookie),
                                    (b"content-length", b"0"), (b"cache-control", b"no-store")]})
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


def same_origin(origin: str | None, host_header: str | None, names: frozenset[str]) -> bool:
    """Whether a state-changing request comes from the board's own page: Host names the board (see hosts.py) and
    Origin is that very host (a page of another site, or of another port here, sends its own origin)."""
    if not origin or not host_header or not host_allowed(host_header, names):
        return False
    return origin in (f"http://{host_header}", f"https://{host_header}")


def file_inside(root: Path, relative: str) -> Path | None:
    """The file `relative` names under `root`, or None when it is missing or lies outside (.., symlinks)."""
    base = root.resolve()
    try:
        path = (base / relative).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            return None
    except (OSError, RuntimeError, ValueError):
        return None
    return path


def inside(path: Path, root: Path) -> Path:
    """`path` resolved, when it lies inside `root`; else a TunelabError (a last guard for paths built from names)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise TunelabError(f"refused to write '{path}': it lies outside the runs folder {root}")
    return resolved
