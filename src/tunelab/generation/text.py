"""A row's answer as text while its tokens come: decoded incrementally, checked for stop strings, and released
for streaming only where it can no longer change.

Decoding all of a row's tokens at every step cost O(length) per token; here each step decodes a short window
(the tokens since the last complete piece, behind a few tokens of context so that a tokenizer that strips the
leading space of a first token, like SentencePiece, strips it on both sides of the comparison). This is the
incremental detokenisation of text-generation-inference and vLLM, a dozen lines that no library exports for
transformers tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONTEXT_TOKENS = 5  # tokens decoded before the new ones, for the tokenizer's context


@dataclass
class AnswerText:
    """The text of one answer as its tokens arrive."""

    tokenizer: object
    stops: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the complete characters so far
    released: int = 0  # how much of `text` was handed out for streaming
    prefix: int = 0  # tokens[prefix:read] decode to the context of the next piece
    read: int = 0

    def add(self, token: int) -> int | None:
        """Take the next token; the index in `text` where a stop string begins, if one is complete now."""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):  # a special token, or half a character
            return None
        start = max(0, len(self.text) - max((len(stop) for stop in self.stops), default=0))
        self.text += after[len(before):]
        self.prefix, self.read = max(self.read - CONTEXT_TOKENS, 0), len(self.tokens)
        hits = [found for found in (self.text.find(stop, start) for stop in self.stops) if found >= 0]
        return min(hits) if hits else None

    def finish(self, cut: int | None = None) -> str:
        """The final text (up to a stop string's start), with any held-back tail."""
        if cut is None:  # a tail of half a character decodes now as the tokenizer would decode it
            whole = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            self.text = whole if whole.startswith(self.text) else self.text
        else:
            self.text = self.text[:cut]
        return self.text

    def release(self) -> str:
        """The text not handed out yet that can no longer change: a tail that might be the start of a stop string
        is held back."""
        hold = max((len(stop) - 1 for stop in self.stops), default=0)
        ready = len(self.text) - hold
        if ready <= self.released:
            return ""
        piece, self.released = self.text[self.released:ready], ready
        return piece

    def rest(self) -> str:
        """What is left to hand out once the answer is final."""
        piece, self.released = self.text[self.released:], len(self.text)
        return piece
