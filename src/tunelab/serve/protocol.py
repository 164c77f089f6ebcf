"""The wire protocol of `tunelab serve`: what each endpoint accepts and returns, in OpenAI's shapes.

Requests are pydantic models, so a wrong type or a value out of range is refused before it reaches the engine
(the app turns the validation error into a 400 naming the field). Responses are plain dicts built by the helpers
at the bottom, shaped as the OpenAI API documents them, so the official `openai` client parses them unchanged.
Every limit a client can hit is a constant here.

Types are strict, as OpenAI's are: an integer field refuses strings, floats and booleans (`"max_tokens": "16"`,
`"top_k": true`), a float field takes integers but no strings or booleans, a boolean refuses 0/1 and "true", and
floats refuse NaN and infinities (Python's JSON reader accepts them). Lax coercion hid client bugs.

Texts (message content and text parts, prompt, input, stop, model) are any Unicode a client can send, control
characters included: \n and \t are ordinary text, and NUL and the other C0 controls are passed to the tokenizer
like any character (they are valid UTF-8; refusing them would break clients that send binary-ish logs or code).
Only a lone UTF-16 surrogate (`"a\ud800b"`, valid JSON) is refused with a 400 naming the field: it is no
character, cannot be encoded as UTF-8, and made the tokenizer raise (a 500).

OpenAI parameters tunelab does not implement (logprobs, tools, response_format json, logit_bias, penalties, echo,
best_of, suffix, …) are refused with a 400 naming the parameter rather than ignored, so a client never takes an
answer for what it did not ask; their neutral values, which clients send by default (`logprobs: false`,
`presence_penalty: 0`, `response_format: {"type": "text"}`, …), pass. Unknown fields (`user`, `metadata`,
`store`) are ignored. `top_k` is supported as vLLM's extension: an int, -1 or 0 = off.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_BODY_BYTES = 1 << 20  # a request body over 1 MiB is refused with 413 before it is parsed
BODY_TIMEOUT_S = 10.0  # a body must arrive whole within this (env TUNELAB_SERVE_BODY_TIMEOUT), else 408
MAX_TOKENS_LIMIT = 1024  # ceiling of max_tokens (the model's context length may set a lower one)
DEFAULT_MAX_TOKENS = 128  # when a request names none
MAX_CHOICES = 8  # ceiling of n
MAX_STOPS = 4  # stop sequences per request, as OpenAI allows
MAX_INPUTS = 256  # texts per embeddings / classify request
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 100_000  # one message, prompt or input text
MAX_TOP_K = 100_000  # top_k above a vocabulary's size is the same as off


class APIError(Exception):
    """The one error a request can end in; the app writes it as `{"error": {message, type, param, code}}`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        # a message quoting the client's text must still encode as UTF-8 (a lone surrogate would not)
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def no_lone_surrogate(text: Any) -> Any:
    """A text that UTF-8 can carry: a lone surrogate is refused here, before a tokenizer raises on it (checked
    before the type, so the message says why rather than pydantic's "should be a valid string")."""
    try:
        text.encode("utf-8") if isinstance(text, str) else None
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at character "
                         f"{exc.start}; send valid Unicode") from None
    return text


Text = Annotated[str, BeforeValidator(no_lone_surrogate)]


class Strict(BaseModel):
    """Strict types (see the module docstring); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class Request(Strict):
    """Fields every endpoint shares. Unknown fields (sent by some clients: user, metadata, store, …) are ignored."""

    model: Text = Field(min_length=1, max_length=512)


class TextPart(Strict):
    """One part of a message's content given as a list (only text parts exist on a text model)."""

    type: Literal["text"]
    text: Text = Field(max_length=MAX_TEXT_CHARS)


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart] = Field(max_length=MAX_TEXT_CHARS)

    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


def is_zero(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and value == 0)


# OpenAI parameters tunelab does not implement, each with the test of its neutral value(s): the values clients send
# when the user asked for nothing (None is JSON null). Anything else is refused naming the parameter.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda value: value is None or value is False,
    "top_logprobs": is_zero,
    "tools": lambda value: value is None or value == [],
    "tool_choice": lambda value: value is None or value == "none",
    "functions": lambda value: value is None or value == [],
    "function_call": lambda value: value is None or value == "none",
    "response_format": lambda value: value is None or value == {"type": "text"},
    "logit_bias": lambda value: value is None or value == {},
    "presence_penalty": is_zero,
    "frequency_penalty": is_zero,
    "echo": lambda value: value is None or value is False,
    "best_of": lambda value: value is None or (type(value) is int and value == 1),
    "suffix": lambda value: value is None or value == "",
}


class Sampling(Request):
    """Generation settings of /v1/chat/completions and /v1/completions."""

    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1, le=MAX_TOP_K)  # vLLM's extension: sample among the k likeliest; -1 or 0: off
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Text | list[Text] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extension: answers run to max_tokens (load tests)
    stream_options: StreamOptions | None = None
    # declared only to be refused unless neutral (UNSUPPORTED); typed Any so the refusal names them, not their type
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if not UNSUPPORTED[info.field_name](value):
            raise PydanticCustomError("unsupported", f"'{info.field_name}' is not supported by tunelab serve; "
                                                     f"leave it out")
        return value

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not stop or len(stop) > 256 for stop in stops):
            raise ValueError("each stop sequence must be 1 to 256 characters")
        return stops

    def token_budget(self) -> int:
        """The most new tokens a choice may have."""
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(Sampling):
    prompt: Text | list[Text] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value: str | list[str]) -> str:
        """One prompt per request: a list is accepted when it holds exactly one (as some clients always send)."""
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"give one prompt per request (a string), got a list of {len(value)}")
            value = value[0]
        if not value or len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"the prompt must be 1 to {MAX_TEXT_CHARS} characters")
        return value


def text_list(value: str | list[str]) -> list[str]:
    """`input` as a non-empty list of non-empty texts within the limits."""
    texts = [value] if isinstance(value, str) else value
    if not texts or len(texts) > MAX_INPUTS:
        raise ValueError(f"give 1 to {MAX_INPUTS} texts, got {len(texts)}")
    for index, text in enumerate(texts):
        if not text.strip() or len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text {index} must be 1 to {MAX_TEXT_CHARS} characters and not blank")
    return texts


class EmbeddingRequest(Request):
    input: Text | list[Text]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai client's default)
    dimensions: None = None  # a fixed-size encoder cannot shorten its vectors

    @field_validator("input")
    @classmethod
    def check_input(cls, value: str | list[str]) -> list[str]:
        return text_list(value)


class ClassifyRequest(Request):
    """tunelab's own endpoint: `{"model", "input": [texts], "top_k": 3}` → labels with probabilities."""

    input: Text | list[Text]
    top_k: int = Field(1, ge=1, le=100)

    @field_validator("input")
    @classmethod
    def check_input(cls, value: str | list[str]) -> list[str]:
        return text_list(value)


class ScoreRequest(Request):
    """tunelab's own endpoint for reward-model runs: `{"model", "input": [texts]}` (whole transcripts) or
    `{"model", "prompt": [...], "response": [...]}` (joined as the run joined them) → one scalar each, higher =
    preferred."""

    input: Text | list[Text] | None = None
    prompt: Text | list[Text] | None = None
    response: Text | list[Text] | None = None

    @field_validator("input", "prompt", "response")
    @classmethod
    def check_texts(cls, value: str | list[str] | None) -> list[str] | None:
        return None if value is None else text_list(value)

    @model_validator(mode="after")
    def one_way(self) -> ScoreRequest:
        if (self.input is None) == (self.prompt is None and self.response is None):
            raise ValueError("give either input (whole texts) or prompt and response")
        if self.input is None and (self.prompt is None or self.response is None
                                   or len(self.prompt) != len(self.response)):
            raise ValueError("prompt and response must both be given, with as many of each")
        return self

    def pairs(self) -> tuple[list[str], list[str]]:
        """(prompts, responses); a whole text is a prompt with an empty response."""
        if self.input is not None:
            return self.input, [""] * len(self.input)
        return self.prompt, self.response


def new_id(prefix: str) -> str:
    """An id like OpenAI's (`chatcmpl-…`, `cmpl-…`)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request_id: str, model: str, answers: list[tuple[str, str]], prompt_tokens: int,
                  completion_tokens: int) -> dict:
    """A chat.completion object; `answers` holds (text, finish_reason) per choice."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                         "logprobs": None} for i, (text, reason) in enumerate(answers)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(request_id: str, model: str, index: int, delta: dict, finish_reason: str | None) -> dict:
    """One chat.completion.chunk of a stream."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_response(request_id: str, model: str, answers: list[tuple[str, str]], prompt_tokens: int,
                        completion_tokens: int) -> dict:
    """A text_completion object."""
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                        for i, (text, reason) in enumerate(answers)],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    """One text_completion chunk of a stream."""
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(request_id: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream when stream_options.include_usage is set: no choices, only usage."""
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def embedding_response(model: str, vectors: np.ndarray, prompt_tokens: int, encoding: str) -> dict:
    """Vectors as lists of floats, or as base64 of their little-endian float32 bytes (what the client decodes)."""
    rows = ([base64.b64encode(vector.astype("<f4").tobytes()).decode() for vector in vectors] if encoding == "base64"
            else vectors.tolist())
    return {"object": "list", "model": model, "usage": usage(prompt_tokens),
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]}


def classify_response(model: str, rows: list[dict], prompt_tokens: int) -> dict:
    """`rows` are `tunelab predict`'s results (label, probability, top); each gets its index."""
    return {"object": "list", "model": model, "usage": usage(prompt_tokens),
            "data": [{"object": "classification", "index": i, **row} for i, row in enumerate(rows)]}


def score_response(model: str, scores: list[float], prompt_tokens: int) -> dict:
    """One `score` object per text, in the order given."""
    return {"object": "list", "model": model, "usage": usage(prompt_tokens),
            "data": [{"object": "score", "index": i, "score": value} for i, value in enumerate(scores)]}


def model_list(model: str, owner: str = "tunelab") -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": owner}]}
