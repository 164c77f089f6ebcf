"""What keeps the board safe on a shared machine: requests that change anything must come from the board's own
pages (Origin and Host both name the board, which also defeats DNS rebinding: a rebound page's Host is its own
name), and files are served only from inside the runs folder."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def allowed_hosts(host: str, port: int) -> set[str]:
    """`host:port` values under which the board is reached: its bind address (and localhost names on loopback)."""
    names = {f"[{host}]" if ":" in host else host}
    if host in ("127.0.0.1", "::1", "localhost"):
        names |= set(LOOPBACK_NAMES)
    return {f"{name}:{port}" for name in names}


def is_ip_host(host_header: str) -> bool:
    """Whether a Host header names an IP address (not a DNS name a rebinding attack could point here)."""
    host = urlsplit(f"//{host_header}").hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def same_origin(origin: str | None, host_header: str | None, bind_host: str, port: int) -> bool:
    """Whether a state-changing request comes from the board's own page: Host is the board, Origin is that host."""
    if not origin or not host_header:
        return False
    if bind_host in ("0.0.0.0", "::"):  # bound to every address: accept IP hosts on this port, never names
        host_ok = is_ip_host(host_header) and host_header.rsplit(":", 1)[-1] == str(port)
    else:
        host_ok = host_header in allowed_hosts(bind_host, port)
    return host_ok and origin == f"http://{host_header}"


def file_inside(root: Path, relative: str) -> Path | None:
    """The file `relative` names under `root`, or None when it is missing or lies outside (.., symlinks)."""
    base = root.resolve()
    try:
        path = (base / relative).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path
