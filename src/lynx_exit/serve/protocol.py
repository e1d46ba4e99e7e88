"""Request bodies of the OpenAI-compatible API, the server's options, and the errors it answers with.

Bodies are parsed strictly: an unknown field, a wrong type (no "8" for 8, no true for 1) or a
value out of range is a 400 naming the field and the value, in OpenAI's error shape. Fields OpenAI clients may
send that this server cannot honour (penalties, logprobs, tools) are accepted only at their neutral values, so
a request is never answered as if they had been applied."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from lynx_exit.engine import EngineConfig, GenerationConfig


class APIError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ServerOptions:
    """What `lynx-exit serve`'s flags set; each request may override the sampling and exit fields."""

    model_name: str
    defaults: GenerationConfig = GenerationConfig()
    exit_method: str = "never"
    exit_defaults: tuple[tuple[str, Any], ...] = ()  # knob values and options used when a request omits them
    max_batch_size: int = 16
    engine: EngineConfig = (
        EngineConfig()
    )  # the KV budget, the prefill budget, --compile (the batch size is the above)
    max_queue: int = 64  # requests waiting for a batch row beyond the running ones
    max_n: int = 8
    max_tokens_limit: int | None = None  # None: the model's context length
    api_key: str | None = None
    probe: str | None = None
    deepconf: str | None = None  # deepconf's warm-up folder
    max_body_bytes: int = 4 * 2**20  # a larger request body is answered 413 before it is read
    probe_label: str | None = None  # how /v1/models names the probe (never a path on this machine)
    ui: bool = True  # the playground page at `/`
    shutdown_timeout_s: float = 30.0
    stream_interval_ms: float = (
        20.0  # tokens are sent at most this often per request (first token and end at once)
    )
    max_chunk_rate: float = (
        500.0  # chunks per second over all streams: the interval grows with the running requests
    )

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_n", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if not (math.isfinite(self.max_chunk_rate) and self.max_chunk_rate > 0):
            raise ValueError(f"max_chunk_rate must be > 0, got {self.max_chunk_rate}")
        for name in ("shutdown_timeout_s", "stream_interval_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def capacity(self) -> int:
        """Rows that may be running or waiting at once; more answer 503."""
        return self.max_batch_size + self.max_queue


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    # lynx-exit's own: each decision point as it passes (its kind, position, score and threshold), in
    # `lynx_points`
    lynx_decision_points: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # vLLM's extension; 0 = off
    min_tokens: int | None = Field(
        default=None, ge=0
    )  # vLLM's extension: end-of-sequence is held off until then
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    exit: dict[str, Any] | None = None  # early-exit settings: {"method": ..., knob and options}
    user: str | None = None
    # Accepted at their neutral values only (see the module docstring).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None

    def check_neutral(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise bad_request(
                    name, f"{name} is not supported by this server (got {value!r}); leave it unset or 0"
                )
        for name in ("logprobs", "top_logprobs"):
            value = getattr(self, name)
            if value not in (None, False, 0):
                raise bad_request(name, f"{name} is not supported by this server (got {value!r})")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise bad_request("stop", f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise bad_request("stop", f"stop strings must not be empty, got {stops!r}")
        return tuple(stops)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # vLLM's extension: keyword arguments for the chat template, e.g. {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise bad_request(
                "max_completion_tokens",
                f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                f"({self.max_completion_tokens}) disagree; send one",
            )
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# Prompts one completions request may list (the server's capacity in rows is checked after, before tokenizing)
MAX_PROMPTS = 2048


def _prompt_kind(value: Any) -> str:
    """Which form of `prompt` a body sends, from its first item: only that member of the union validates it
    (trying each member over a long list costs seconds and an error per item: 838,460 one-character prompts,
    1.6 s)."""
    if isinstance(value, list) and value and isinstance(value[0], int):
        return "prompt-ids"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return "prompt-id-lists"
    return "prompt-texts" if isinstance(value, list) else "prompt-text"


PromptField = Annotated[
    Annotated[str, Tag("prompt-text")]
    | Annotated[list[str], Field(max_length=MAX_PROMPTS), Tag("prompt-texts")]
    | Annotated[list[int], Tag("prompt-ids")]
    | Annotated[list[list[int]], Field(max_length=MAX_PROMPTS), Tag("prompt-id-lists")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(_Sampling):
    prompt: PromptField
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def token_limit(self) -> int | None:
        if self.echo:
            raise bad_request("echo", "echo is not supported by this server")
        if self.suffix:
            raise bad_request("suffix", "suffix is not supported by this server")
        if self.best_of not in (None, 1, self.n):
            raise bad_request("best_of", f"best_of is not supported by this server (got {self.best_of})")
        return self.max_tokens


def _count_prompts(raw: bytes) -> None:
    """A large completions body's prompt list, counted by the C JSON parser (12 ms and one shared string per
    character for 4 MB of one-character prompts) before pydantic validates item by item (0.2 s holding the
    GIL)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return  # pydantic says what is wrong
    prompt = data.get("prompt") if isinstance(data, dict) else None
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
        raise bad_request(
            "prompt", f"prompt lists {len(prompt)} prompts; a request takes at most {MAX_PROMPTS}"
        )


def parse_body(model: type[_Sampling], raw: bytes) -> Any:
    """Parse and validate a JSON body; any fault is a 400 naming the field and the value."""
    if model is CompletionRequest and len(raw) > 2**18:
        _count_prompts(raw)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        error = errors[0]
        if error["type"] == "json_invalid":
            raise bad_request(
                None,
                f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}",
                code="invalid_json",
            ) from None
        loc = error["loc"]
        # An unknown field's own name is never a type tag: only the path to it is cleaned
        param = (
            ".".join(filter(None, [_param(loc[:-1]), str(loc[-1])]))
            if error["type"] == "extra_forbidden" and loc
            else _param(loc)
        )
        # A field of several types fails once per type: name them all in one message.
        messages = list(
            dict.fromkeys(e["msg"] for e in errors if _param(e["loc"]) == param and e["type"] != "missing")
        )
        value = error.get("input")
        shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
        where = param or "the body"
        if error["type"] == "extra_forbidden":
            message = f"unknown field {param!r} (got {shown})"
        elif error["type"] == "missing":
            message = f"{where}: {error['msg']}"
        else:
            message = f"{where}: {' or '.join(messages) or error['msg']} (got {shown})"
        raise bad_request(param, message) from None


def _param(loc: tuple[Any, ...]) -> str | None:
    """A dotted field path without pydantic's union-member tags (`messages.0.content`, not
    `...content.str`)."""
    parts = [str(part) for part in loc if not (isinstance(part, str) and _is_type_tag(part))]
    return ".".join(parts) or None


def _is_type_tag(part: str) -> bool:
    # Field names here are lower-case identifiers; pydantic names union members by type ("str",
    # "list[int]", "ContentPart", "function-after[...]").
    return part in {"str", "int", "float", "bool", "none"} or "[" in part or "-" in part or part[:1].isupper()
