"""The one exception type users see, and how it is shown."""

from __future__ import annotations


class TunelabError(Exception):
    """A problem the user can fix: the message names the field, the value and the fix, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def one_line(text: str, limit: int = 400) -> str:
    """Collapse a library's multi-line error text into one short line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
