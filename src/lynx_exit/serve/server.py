"""The server's state: the engine worker, admission (rows in flight against the capacity) and the metrics.

A body is checked and planned by `planning` (a 4xx names the field and the value) before it reaches the
engine; `start` turns a plan into engine tickets. The HTTP routes live in `app.py`, the response bodies in
`responses.py`."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lynx_exit.engine import Engine
from lynx_exit.engine.backend import token_budget
from lynx_exit.exits import MethodContext, get_method
from lynx_exit.models import LoadedModel
from lynx_exit.serve.generation import Generation
from lynx_exit.serve.metrics import ServerMetrics
from lynx_exit.serve.planning import Planner, RequestPlan
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


class Server:
    """The model, its engine worker and what every route shares."""

    def __init__(
        self,
        lm: LoadedModel,
        options: ServerOptions,
        engine_factory: Callable[[], Engine] | None = None,
        assistant: LoadedModel | None = None,
        assist: Any = None,
    ) -> None:
        self.lm = lm
        self.options = options
        self.context_length = lm.context_length
        self.metrics = ServerMetrics(options.max_batch_size)
        self.methods = MethodContext(
            lm=lm, probe=options.probe, deepconf=options.deepconf, assistant=assistant, assist=assist
        )
        settings = dataclasses.replace(options.engine, max_batch_size=options.max_batch_size)
        factory = engine_factory or (lambda: Engine(lm, config=settings, assistant=assistant))
        self.worker = EngineWorker(
            factory,
            on_step=self.metrics.observe_engine,
            stream_interval_s=options.stream_interval_ms / 1000,
            max_chunk_rate=options.max_chunk_rate,
        )
        # Templating and tokenizing run here, off the event loop, one request at a time.
        self.prompt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lynx-exit-prompts")
        self.planner = Planner(lm, options, self.methods, lambda: token_budget(self.worker.engine.backend))
        self.in_flight = 0  # rows submitted and not finished; touched on the event loop only
        self.accepting = True
        self.started = int(time.time())
        try:
            self.planner.resolve_exit(
                None
            )  # the server's own exit settings must build (and load the probe now)
        except APIError as exc:
            raise ValueError(f"the server's exit settings do not work: {exc.message}") from None

    # -- planning and admission ----------------------------------------------------------------
    @property
    def max_chars_per_position(self) -> int:
        return self.planner.max_chars_per_position

    def plan(self, request: ChatCompletionRequest | CompletionRequest) -> RequestPlan:
        """The request checked and planned (see `planning`); a 4xx names what is wrong."""
        return self.planner.plan(request)

    def admit(self, plan: RequestPlan) -> None:
        rows = plan.rows
        if not self.accepting:
            raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down")
        if rows > self.options.capacity:
            param, what = (
                ("prompt", f"{len(plan.prompts)} prompts × n {plan.n}")
                if len(plan.prompts) > 1
                else ("n", f"n {plan.n}")
            )
            raise bad_request(
                param,
                f"the request needs {rows} rows ({what}); this server runs at most "
                f"{self.options.capacity} at once",
            )
        if self.in_flight + rows > self.options.capacity:
            raise APIError(
                503,
                f"the server is at capacity ({self.in_flight} rows running or queued, limit "
                f"{self.options.capacity}); retry later",
                kind="server_error",
                code="server_overloaded",
            )

    def start(self, plan: RequestPlan, seed: int | None, split: bool, points: bool = False) -> Generation:
        """Submit a planned request to the engine; `split` sends thinking to `reasoning_content`; `points`
        reports each decision point as it passes."""
        self.admit(plan)
        base = secrets.randbelow(_SEED_RANGE) if seed is None else seed % _SEED_RANGE
        policies = self.planner.policies(plan.exit, plan.rows)
        assist = None
        if get_method(plan.exit.method).assisted:
            from lynx_exit.engine.assist import AssistConfig

            assist = self.methods.assist or AssistConfig()
        tickets, texts = [], []
        for i in range(plan.rows):
            tickets.append(
                Ticket(
                    i,
                    plan.prompts[i // plan.n],
                    plan.config,
                    policies[i],
                    (base + i) % _SEED_RANGE,
                    thinking=plan.thinking,
                    assist=assist,
                    points=points,
                )
            )
            texts.append(
                ChoiceText.for_profile(self.lm.profile, plan.stop, split=split, thinking=plan.thinking)
            )
        generation = Generation(
            self.worker, tickets, texts, lambda t, e, stopped: self._finished(plan, t, e, stopped)
        )
        self.in_flight += plan.rows
        generation.start()
        return generation

    def _finished(self, plan: RequestPlan, ticket: Ticket, event: Finish | Failure, stopped: bool) -> None:
        """Count a finished choice; `stopped`: a stop string ended it (the engine saw an abort)."""
        self.in_flight -= 1
        m = self.metrics
        if isinstance(event, Failure):
            m.choices.labels("error").inc()
            return
        result = event.result
        m.choices.labels(
            "stop" if stopped and result.finish_reason == "abort" else result.finish_reason
        ).inc()
        m.generated_tokens.inc(len(result.token_ids))
        m.reasoning_tokens.inc(result.reasoning_tokens)
        if result.exit_index is not None:
            m.exits.labels(plan.exit.method).inc()
            m.exit_points.labels(result.exit_point or "other", "true" if result.gave_up else "false").inc()
            m.saved_tokens.inc(max(0, ticket.config.max_new_tokens - result.reasoning_tokens))
        m.latency.observe(time.perf_counter() - ticket.submitted)
        if event.first_token_s is not None:
            m.ttft.observe(event.first_token_s)
