"""Request planning: a parsed body → a `RequestPlan` (prompts, sampling, exit settings), or a 4xx naming the
field.

The work a body can cost is bounded before it is done: every limit that the parsed body shows (the model, `n`,
the number of prompts and messages, the characters of the text, the template switches) is checked before any
template is rendered or any text tokenized, and a rendered chat is measured before it is tokenized. Planning
runs on the server's prompt thread, off the event loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lynx_exit.engine import GenerationConfig
from lynx_exit.engine.types import ExitPolicy
from lynx_exit.exits import ExitSettingError, MethodContext, make_policy, resolve_exit_options
from lynx_exit.models import LoadedModel
from lynx_exit.models.profile import ThinkingStart
from lynx_exit.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ServerOptions,
    bad_request,
)

# apply_chat_template's own parameters: a request's chat_template_kwargs may not set them.
_TEMPLATE_RESERVED = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


@dataclass
class ExitChoice:
    """A request's resolved early-exit settings."""

    method: str
    options: dict[str, Any]  # knob and options as given to `make_policy`
    settings: dict[str, Any]  # what the response reports (pinned options included)


@dataclass
class RequestPlan:
    prompts: list[list[int]]
    n: int
    config: GenerationConfig
    exit: ExitChoice
    stop: tuple[str, ...]
    thinking: ThinkingStart | None = None  # how a chat prompt starts thinking under its chat_template_kwargs

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


def _allowed(value: Any, values: tuple[Any, ...]) -> bool:
    return any(type(value) is type(v) and value == v for v in values)  # True is not 1


class Planner:
    """Checks and plans requests for one model and one set of server options."""

    def __init__(
        self,
        lm: LoadedModel,
        options: ServerOptions,
        methods: MethodContext,
        token_budget: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.lm, self.options, self.methods = lm, options, methods
        self.token_budget = token_budget  # tokens of KV cache the engine may hold (None: no budget)
        # What an exit may add to a request's tokens: the cue and the forced answer
        self.exit_room = len(lm.exit_cue_ids(options.defaults.exit_cue)) + options.defaults.answer_max_tokens
        self.context_length = lm.context_length
        # No token spells more characters than the longest vocabulary entry, and a normaliser can
        # merge at most a few code points into one (Hangul jamo: 3 -> 1): text longer than this many
        # characters per context position cannot fit, and is refused before the template or the tokenizer
        # reads it.
        self.max_chars_per_position = 3 * max((len(token) for token in lm.tokenizer.get_vocab()), default=1)

    # -- exit settings -------------------------------------------------------------------------
    def resolve_exit(self, body: dict[str, Any] | None) -> ExitChoice:
        """A request's `exit` object over the server's defaults, checked by the registry and by building a
        policy."""
        try:
            name, options, settings = resolve_exit_options(
                body, self.options.exit_method, dict(self.options.exit_defaults), self.methods
            )
        except ExitSettingError as exc:
            raise bad_request(exc.param, str(exc), code=exc.code) from None
        return ExitChoice(name, options, settings)

    def policies(self, choice: ExitChoice, count: int) -> list[ExitPolicy | None]:
        if choice.method == "never":  # no policy at all: the engine skips the per-step policy work
            return [None] * count
        return [make_policy(choice.method, self.methods, **choice.options) for _ in range(count)]

    # -- prompts and limits --------------------------------------------------------------------
    def check_length(self, characters: int, param: str) -> None:
        """Refuse text that cannot fit the context whatever its tokens, before anything tokenizes it."""
        ctx = self.context_length
        if ctx is not None and characters > ctx * self.max_chars_per_position:
            raise bad_request(
                param,
                f"the {param} has {characters} characters, more than the model's context of {ctx} "
                f"tokens can hold",
                code="context_length_exceeded",
            )

    def template_kwargs(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """The request's chat-template switches: only those the model's family declares, with their values."""
        kwargs = dict(request.chat_template_kwargs or {})
        switches = dict(self.lm.profile.switches)
        for key, value in kwargs.items():
            param = f"chat_template_kwargs.{key}"
            if key in _TEMPLATE_RESERVED:
                raise bad_request(param, f"chat_template_kwargs may not set {key!r}: the server sets it")
            if key.endswith("_token") or key.endswith("_tokens"):
                raise bad_request(
                    param, f"chat_template_kwargs may not set {key!r}: special tokens are the tokenizer's"
                )
            if key not in switches:
                takes = ", ".join(sorted(switches)) or "no switches"
                raise bad_request(
                    param, f"model {self.options.model_name!r}'s chat template takes {takes}; got {key!r}"
                )
            if not _allowed(value, switches[key]):
                raise bad_request(
                    param, f"chat_template_kwargs.{key} must be one of {list(switches[key])}, got {value!r}"
                )
        return kwargs

    def chat_prompt(self, request: ChatCompletionRequest) -> tuple[list[int], ThinkingStart]:
        """The prompt's token ids (the profile's template switches and system prompt, then the request's), and
        how it starts thinking."""
        if not getattr(self.lm.tokenizer, "chat_template", None):
            raise bad_request(
                "messages",
                f"model {self.options.model_name!r} has no chat template; "
                "send a raw prompt to /v1/completions",
            )
        ctx = self.context_length
        if ctx is not None and len(request.messages) > ctx:  # every message renders to one token at least
            raise bad_request(
                "messages",
                f"{len(request.messages)} messages cannot fit the model's context of {ctx} tokens",
                code="context_length_exceeded",
            )
        # "developer" is OpenAI's newer name for the system role: templates know only "system"
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        self.check_length(sum(len(m["content"]) for m in messages), "messages")
        kwargs = self.template_kwargs(request)
        try:
            text = self.lm.chat_text(messages, kwargs)
        except Exception as exc:  # the template's own checks (e.g. role order) raise jinja errors
            param = "chat_template_kwargs" if kwargs else "messages"
            raise bad_request(param, f"the chat template rejected the request: {exc}") from None
        self.check_length(len(text), "messages")  # the rendered chat, before it is tokenized
        return self.lm.encode(text), self.lm.thinking_with(kwargs)

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        given: Any = request.prompt
        if not given:
            raise bad_request("prompt", "prompt must not be empty")
        prompt: list[Any] = (
            [given] if isinstance(given, str) or all(isinstance(p, int) for p in given) else list(given)
        )
        rows, capacity = len(prompt) * request.n, self.options.capacity
        if rows > capacity:  # before a single prompt is tokenized
            raise bad_request(
                "prompt",
                f"the request needs {rows} rows ({len(prompt)} prompts × n {request.n}); this "
                f"server runs at most {capacity} at once",
            )
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                if not item:
                    raise bad_request("prompt", f"prompt {i} is empty")
                self.check_length(len(item), "prompt")
        vocab = len(self.lm.tokenizer)
        out = []
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                out.append(list(self.lm.tokenizer(item)["input_ids"]))
            else:
                ids = [int(t) for t in item]
                bad = [t for t in ids if not 0 <= t < vocab]
                if not ids or bad:
                    raise bad_request(
                        "prompt",
                        f"prompt {i}: token ids must be a non-empty list in [0, {vocab}), got "
                        f"{bad[:5] or ids}",
                    )
                out.append(ids)
        return out

    def max_new_tokens(self, prompts: list[list[int]], requested: int | None, param: str) -> int:
        ctx, limit = self.context_length, self.options.max_tokens_limit or self.context_length
        longest = max(len(p) for p in prompts)
        if ctx is not None and longest >= ctx:
            raise bad_request(
                param,
                f"the prompt is {longest} tokens; the model's context is {ctx} tokens",
                code="context_length_exceeded",
            )
        budget = self.token_budget()
        exit_room = self.exit_room
        if requested is not None:
            if limit is not None and requested > limit:
                raise bad_request(
                    "max_tokens", f"max_tokens {requested} is above this server's limit of {limit}"
                )
            if ctx is not None and longest + requested > ctx:
                raise bad_request(
                    "max_tokens",
                    f"the prompt ({longest} tokens) plus max_tokens ({requested}) exceeds the "
                    f"model's context of {ctx} tokens",
                    code="context_length_exceeded",
                )
        else:
            room = [self.options.defaults.max_new_tokens] + [x for x in (limit, ctx and ctx - longest) if x]
            if budget is not None:
                room.append(max(1, budget - longest - exit_room))
            requested = min(room)
        if (
            budget is not None and longest + requested + exit_room > budget
        ):  # it could never run: no use queueing it
            raise bad_request(
                "max_tokens",
                f"the prompt ({longest} tokens) plus max_tokens ({requested}) and room for an "
                f"exit's answer ({exit_room}) need {longest + requested + exit_room} tokens of KV "
                f"cache; this server's --kv-cache-gb holds {budget}",
                code="kv_cache_exceeded",
            )
        return requested

    # -- the plan ------------------------------------------------------------------------------
    def plan(self, request: ChatCompletionRequest | CompletionRequest) -> RequestPlan:
        if request.model != self.options.model_name:
            raise APIError(
                404,
                f"model {request.model!r} does not exist; this server serves {self.options.model_name!r}",
                param="model",
                code="model_not_found",
            )
        request.check_neutral()
        if request.n > self.options.max_n:
            raise bad_request("n", f"n {request.n} is above this server's limit of {self.options.max_n}")
        stop = request.stop_strings()
        requested = request.token_limit()
        exit_choice = self.resolve_exit(request.exit)  # cheap: before the prompts
        thinking = None
        if isinstance(request, ChatCompletionRequest):
            prompt, thinking = self.chat_prompt(request)
            prompts, param = [prompt], "messages"
        else:
            prompts, param = self.completion_prompts(request), "prompt"
        max_new = self.max_new_tokens(prompts, requested, param)
        defaults = self.options.defaults
        changes: dict[str, Any] = {
            "max_new_tokens": max_new,
            "min_new_tokens": min(max_new, defaults.min_new_tokens),
        }
        if request.min_tokens is not None:
            if request.min_tokens > max_new:
                raise bad_request(
                    "min_tokens", f"min_tokens {request.min_tokens} is above max_tokens {max_new}"
                )
            changes["min_new_tokens"] = request.min_tokens
        for name in ("temperature", "top_p", "top_k"):
            if getattr(request, name) is not None:
                changes[name] = getattr(request, name)
        try:
            config = dataclasses.replace(defaults, **changes)
        except ValueError as exc:
            raise bad_request(str(exc).split(" ", 1)[0], str(exc)) from None
        return RequestPlan(prompts, request.n, config, exit_choice, stop, thinking)
