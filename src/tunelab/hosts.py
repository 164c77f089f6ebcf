"""Which Host headers a local server answers: the guard of `tunelab serve` and `tunelab ui` against DNS rebinding.

A web page on evil.example can point its own name at 127.0.0.1 and then read a loopback server as same-origin;
its requests still carry `Host: evil.example`. So every route answers only a Host that names this machine the way
its user does: a loopback name, the bind address given with --host, a name given with --allowed-hosts, or an IP
literal (a rebinding attack needs a DNS name; an IP is its own origin). `--allowed-hosts '*'` turns the check off.
Jupyter Server (`allow_remote_access`, `local_hostnames`) and vLLM's newer releases guard the same way.

Why not Starlette's TrustedHostMiddleware: it answers in plain text (serve must answer OpenAI's JSON error), splits
`[::1]:8000` at the first colon, and knows no IP-literal rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})


def host_name(header: str) -> str | None:
    """The name of a Host header without its port (`[::1]:80` → `::1`, `Example.COM.:80` → `example.com`)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = header.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.rstrip(".")
    return name or None


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(bind_host: str) -> bool:
    """Whether a bind address is reachable from this machine only (`127.0.0.1`, `::1`, `[::1]`, `localhost`)."""
    name = bind_host.strip("[]").lower()
    if name == "localhost":
        return True
    return is_ip(name) and ipaddress.ip_address(name).is_loopback


def allowed_names(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The names answered: loopback names, the bind address (unless it is every address) and `extra`."""
    names = set(LOOPBACK_NAMES) | {name.strip().strip("[]").lower().rstrip(".") for name in extra if name.strip()}
    if bind_host not in WILDCARD_BINDS:
        names.add(bind_host.strip("[]").lower())
    return frozenset(names)


def host_allowed(header: str | None, names: frozenset[str]) -> bool:
    """Whether a request's Host header names this server (see the module docstring)."""
    if "*" in names:
        return True
    name = host_name(header or "")
    return name is not None and (name in names or is_ip(name))


class HostAllowList:
    """ASGI middleware: an HTTP request whose Host is not allowed gets `refuse(message)`, a response
    in the app's own error shape, before any route or body is read."""

    def __init__(self, app, names: frozenset[str], refuse: Callable[[str], Callable]) -> None:
        self.app, self.names, self.refuse = app, names, refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not host_allowed(header, self.names):
                shown = header if len(header) <= 80 else header[:79] + "…"
                message = (f"refused: Host '{shown}' is not a name of this server (DNS rebinding guard); "
                           f"start it with --allowed-hosts NAME to answer that name")
                return await self.refuse(message)(scope, receive, send)
        return await self.app(scope, receive, send)
