"""The server's state and request planning: validate a body, turn it into engine tickets, admit it.

Everything a request can get wrong is found here, before anything reaches the engine, and
answered with a 4xx naming the field and the value (exit settings are checked against the exit
method registry and the probe's calibration). The HTTP routes live in `app.py`.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lynx_exit.engine import Engine, GenerationConfig
from lynx_exit.engine.types import ExitPolicy
from lynx_exit.exits import MethodContext, get_method, make_policy
from lynx_exit.models import LoadedModel
from lynx_exit.models.families import ThinkingStart
from lynx_exit.serve.generation import Generation
from lynx_exit.serve.metrics import ServerMetrics
from lynx_exit.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ServerOptions,
    bad_request,
)
from lynx_exit.serve.text import ChoiceText
from lynx_exit.serve.worker import EngineWorker, Failure, Finish, Ticket

_SEED_RANGE = 2**63


@dataclass
class ExitChoice:
    """A request's resolved early-exit settings."""

    method: str
    options: dict[str, Any]  # knob and options as given to `make_policy`
    settings: dict[str, Any]  # what the response reports (pinned options included)


@dataclass
class Plan:
    prompts: list[list[int]]
    n: int
    config: GenerationConfig
    exit: ExitChoice
    stop: tuple[str, ...]
    thinking: ThinkingStart | None = None  # how a chat prompt starts thinking under its chat_template_kwargs

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


class Server:
    """The model, its engine worker and what every route shares."""

    def __init__(self, lm: LoadedModel, options: ServerOptions, engine_factory: Callable[[], Engine] | None = None,
                 assistant: LoadedModel | None = None, assist: Any = None) -> None:
        self.lm = lm
        self.options = options
        self.context_length = lm.context_length
        self.metrics = ServerMetrics(options.max_batch_size)
        self.methods = MethodContext(lm=lm, probe=options.probe, deepconf=options.deepconf, assistant=assistant, assist=assist)
        settings = dataclasses.replace(options.engine, max_batch_size=options.max_batch_size)
        factory = engine_factory or (lambda: Engine(lm, config=settings, assistant=assistant))
        self.worker = EngineWorker(factory, on_step=self.metrics.observe_engine,
                                   stream_interval_s=options.stream_interval_ms / 1000, max_chunk_rate=options.max_chunk_rate)
        # Templating and tokenizing run here, off the event loop, one request at a time.
        self.prompt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lynx-exit-prompts")
        # No token spells more characters than the longest vocabulary entry, and a normaliser can merge at most a
        # few code points into one (Hangul jamo: 3 -> 1): text longer than this many characters per context
        # position cannot fit, and is refused before the template or the tokenizer reads it.
        self.max_chars_per_position = 3 * max((len(token) for token in lm.tokenizer.get_vocab()), default=1)
        self.in_flight = 0  # rows submitted and not finished; touched on the event loop only
        self.accepting = True
        self.started = int(time.time())
        try:
            self.resolve_exit(None)  # the server's own exit settings must build (and load the probe now)
        except APIError as exc:
            raise ValueError(f"the server's exit settings do not work: {exc.message}") from None

    # -- exit settings -------------------------------------------------------------------------
    def resolve_exit(self, body: dict[str, Any] | None) -> ExitChoice:
        """A request's `exit` object over the server's defaults, checked by building a policy once."""
        given = dict(body or {})
        name = given.pop("method", self.options.exit_method)
        if not isinstance(name, str):
            raise bad_request("exit.method", f"exit.method must be a string, got {name!r}")
        try:
            method = get_method(name)
        except ValueError as exc:
            raise bad_request("exit.method", str(exc), code="unknown_exit_method") from None
        if method.needs_probe and self.options.probe is None:
            raise bad_request("exit.method", f"exit method {name!r} needs a probe; this server was started without --probe")
        if method.needs_deepconf and self.options.deepconf is None:
            raise bad_request("exit.method", f"exit method {name!r} needs a warm-up; this server was started without --deepconf")
        accepted = ({method.knob.name} if method.knob else set()) | set(method.option_names)
        unknown = sorted(set(given) - accepted)
        if unknown:
            raise bad_request(f"exit.{unknown[0]}", f"exit method {name!r} takes {sorted(accepted) or 'no settings'} "
                                                    f"besides 'method', got {unknown}")
        defaults = dict(self.options.exit_defaults)
        options: dict[str, Any] = {}
        if method.knob is not None:
            knob = method.knob
            value = given.get(knob.name, defaults.get(knob.name))
            if value is None:
                raise bad_request(f"exit.{knob.name}", f"exit method {name!r} needs exit.{knob.name} ({knob.help})")
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise bad_request(f"exit.{knob.name}", f"exit.{knob.name} must be a number or a string, got {value!r}")
            try:
                options.update(knob.parse_value(str(value), f"exit.{knob.name}"))
            except ValueError as exc:
                raise bad_request(f"exit.{knob.name}", str(exc)) from None
        for option in method.option_names:
            value = given.get(option, defaults.get(option))
            if value is None:
                continue
            try:
                options[option] = method.parse_option(option, value)  # the parsed value is what is reported
            except ValueError as exc:
                raise bad_request(f"exit.{option}", f"exit.{option}: {exc}") from None
        try:
            make_policy(name, self.methods, **options)
        except ValueError as exc:  # e.g. δ not calibrated in the probe: the message lists the calibrated ones
            raise bad_request(f"exit.{method.knob.name}" if method.knob else "exit.method", str(exc)) from None
        return ExitChoice(name, options, {**options, **dict(method.fixed)})

    def policies(self, choice: ExitChoice, count: int) -> list[ExitPolicy | None]:
        if choice.method == "never":  # no policy at all: the engine skips the per-step policy work
            return [None] * count
        return [make_policy(choice.method, self.methods, **choice.options) for _ in range(count)]

    # -- prompts and limits --------------------------------------------------------------------
    def check_length(self, characters: int, param: str) -> None:
        """Refuse text that cannot fit the context whatever its tokens, before anything tokenizes it."""
        ctx = self.context_length
        if ctx is not None and characters > ctx * self.max_chars_per_position:
            raise bad_request(param, f"the {param} has {characters} characters, more than the model's context of {ctx} "
                                     f"tokens can hold", code="context_length_exceeded")

    def chat_prompt(self, request: ChatCompletionRequest) -> tuple[list[int], ThinkingStart]:
        """The prompt's token ids (the profile's template switches and system prompt, then the request's), and
        how it starts thinking."""
        if not getattr(self.lm.tokenizer, "chat_template", None):
            raise bad_request("messages", f"model {self.options.model_name!r} has no chat template; "
                                          "send a raw prompt to /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        self.check_length(sum(len(m["content"]) for m in messages), "messages")
        kwargs = request.template_kwargs()
        try:
            ids = self.lm.chat_ids(messages, kwargs)
        except Exception as exc:  # the template's own checks (e.g. role order) raise jinja errors
            param = "chat_template_kwargs" if kwargs else "messages"
            raise bad_request(param, f"the chat template rejected the request: {exc}") from None
        return ids, self.lm.thinking_with(kwargs)

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        given: Any = request.prompt
        if not given:
            raise bad_request("prompt", "prompt must not be empty")
        prompt: list[Any] = [given] if isinstance(given, str) or all(isinstance(p, int) for p in given) else list(given)
        vocab = len(self.lm.tokenizer)
        out = []
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                if not item:
                    raise bad_request("prompt", f"prompt {i} is empty")
                self.check_length(len(item), "prompt")
                out.append(list(self.lm.tokenizer(item)["input_ids"]))
            else:
                ids = [int(t) for t in item]
                bad = [t for t in ids if not 0 <= t < vocab]
                if not ids or bad:
                    raise bad_request("prompt", f"prompt {i}: token ids must be a non-empty list in [0, {vocab}), got {bad[:5] or ids}")
                out.append(ids)
        return out

    def max_new_tokens(self, prompts: list[list[int]], requested: int | None, param: str) -> int:
        ctx, limit = self.context_length, self.options.max_tokens_limit or self.context_length
        longest = max(len(p) for p in prompts)
        if ctx is not None and longest >= ctx:
            raise bad_request(param, f"the prompt is {longest} tokens; the model's context is {ctx} tokens",
                              code="context_length_exceeded")
        if requested is not None:
            if limit is not None and requested > limit:
                raise bad_request("max_tokens", f"max_tokens {requested} is above this server's limit of {limit}")
            if ctx is not None and longest + requested > ctx:
                raise bad_request("max_tokens", f"the prompt ({longest} tokens) plus max_tokens ({requested}) exceeds the "
                                                f"model's context of {ctx} tokens", code="context_length_exceeded")
            return requested
        room = [self.options.defaults.max_new_tokens] + [x for x in (limit, ctx and ctx - longest) if x]
        return min(room)

    # -- planning and admission ----------------------------------------------------------------
    def plan(self, request: ChatCompletionRequest | CompletionRequest) -> Plan:
        if request.model != self.options.model_name:
            raise APIError(404, f"model {request.model!r} does not exist; this server serves {self.options.model_name!r}",
                           param="model", code="model_not_found")
        request.check_neutral()
        if request.n > self.options.max_n:
            raise bad_request("n", f"n {request.n} is above this server's limit of {self.options.max_n}")
        stop = request.stop_strings()
        requested = request.token_limit()
        thinking = None
        if isinstance(request, ChatCompletionRequest):
            prompt, thinking = self.chat_prompt(request)
            prompts, param = [prompt], "messages"
        else:
            prompts, param = self.completion_prompts(request), "prompt"
        max_new = self.max_new_tokens(prompts, requested, param)
        defaults = self.options.defaults
        changes: dict[str, Any] = {"max_new_tokens": max_new, "min_new_tokens": min(max_new, defaults.min_new_tokens)}
        if request.min_tokens is not None:
            if request.min_tokens > max_new:
                raise bad_request("min_tokens", f"min_tokens {request.min_tokens} is above max_tokens {max_new}")
            changes["min_new_tokens"] = request.min_tokens
        for name in ("temperature", "top_p", "top_k"):
            if getattr(request, name) is not None:
                changes[name] = getattr(request, name)
        try:
            config = dataclasses.replace(defaults, **changes)
        except ValueError as exc:
            raise bad_request(str(exc).split(" ", 1)[0], str(exc)) from None
        exit_choice = self.resolve_exit(request.exit)
        return Plan(prompts, request.n, config, exit_choice, stop, thinking)

    def admit(self, plan: Plan) -> None:
        rows = plan.rows
        if not self.accepting:
            raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down")
        if rows > self.options.capacity:
            param, what = ("prompt", f"{len(plan.prompts)} prompts × n {plan.n}") if len(plan.prompts) > 1 else ("n", f"n {plan.n}")
            raise bad_request(param, f"the request needs {rows} rows ({what}); this server runs at most "
                                     f"{self.options.capacity} at once")
        if self.in_flight + rows > self.options.capacity:
            raise APIError(503, f"the server is at capacity ({self.in_flight} rows running or queued, limit "
                                f"{self.options.capacity}); retry later", kind="server_error", code="server_overloaded")

    def start(self, plan: Plan, seed: int | None, split: bool) -> Generation:
        """Submit a planned request to the engine; `split` sends thinking to `reasoning_content`."""
        self.admit(plan)
        base = secrets.randbelow(_SEED_RANGE) if seed is None else seed % _SEED_RANGE
        policies = self.policies(plan.exit, plan.rows)
        assist = None
        if get_method(plan.exit.method).assisted:
            from lynx_exit.engine.assist import AssistConfig

            assist = self.methods.assist or AssistConfig()
        tickets, texts = [], []
        for i in range(plan.rows):
            tickets.append(Ticket(i, plan.prompts[i // plan.n], plan.config, policies[i], (base + i) % _SEED_RANGE,
                                  thinking=plan.thinking, assist=assist))
            texts.append(ChoiceText.for_profile(self.lm.profile, plan.stop, split=split, thinking=plan.thinking))
        generation = Generation(self.worker, tickets, texts, lambda t, e: self._finished(plan, t, e))
        self.in_flight += plan.rows
        generation.start()
        return generation

    def _finished(self, plan: Plan, ticket: Ticket, event: Finish | Failure) -> None:
        self.in_flight -= 1
        m = self.metrics
        if isinstance(event, Failure):
            m.choices.labels("error").inc()
            return
        result = event.result
        m.choices.labels(result.finish_reason).inc()
        m.generated_tokens.inc(len(result.token_ids))
        m.reasoning_tokens.inc(result.reasoning_tokens)
        if result.exit_index is not None:
            m.exits.labels(plan.exit.method).inc()
            m.saved_tokens.inc(max(0, ticket.config.max_new_tokens - result.reasoning_tokens))
        m.latency.observe(time.perf_counter() - ticket.submitted)
        if event.first_token_s is not None:
            m.ttft.observe(event.first_token_s)
