"""The engine worker: one thread owns the engine; HTTP handlers hand it requests through a queue.

Handlers never touch the engine. They `submit` tickets and `abort` them; the worker thread
admits them between steps (so an abort takes effect before the next forward pass), runs
`Engine.step`, and posts each step's events to the event loop in one call.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lynx_exit.engine import Engine, GenerationConfig
from lynx_exit.engine.types import ExitPolicy, Phase, RequestResult, Step
from lynx_exit.models.profile import ThinkingStart

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TokenEvent:
    text: str
    phase: Phase


@dataclass
class Finish:
    result: RequestResult
    exit_cue: str | None  # the cue word where the policy exited
    exit_score: float | None  # the policy's score there (LYNX: P(safe))
    first_token_s: float | None  # from submission to the first generated token
    queued_s: float  # from submission to admission into the batch


@dataclass
class Failure:
    message: str
    status: int = 500
    code: str = "engine_error"


@dataclass
class PointEvent:
    """A decision point the request passed (streamed when the client asked for them)."""

    point: str  # its kind: cue, answer, paragraph
    index: int  # the generated token's index
    cue: str | None
    score: float | None  # the policy's score (LYNX: P(safe)); None for a method without one
    threshold: float | None  # the score an exit needs here (None: the method has none)
    give_up_below: float | None  # LYNX's give-up threshold here, from its first token on (None: no give-up)
    exit: bool
    gave_up: bool


Event = TokenEvent | PointEvent | Finish | Failure


@dataclass(eq=False)
class Ticket:
    """One engine request (one choice of one HTTP request) as the handler side sees it."""

    choice: int
    prompt_ids: list[int]
    config: GenerationConfig
    policy: ExitPolicy | None
    seed: int
    thinking: ThinkingStart | None = None  # how the prompt starts thinking, if not as the profile says
    assist: Any = None  # Speculative Thinking's AssistConfig, for an assisted exit method
    points: bool = False  # report each decision point as a `PointEvent`
    # Called on the event loop with (choice, events); the request's `Generation` sets it.
    deliver: Callable[[int, list[Event]], None] = field(default=lambda _choice, _events: None)
    submitted: float = field(default_factory=time.perf_counter)
    engine_id: int | None = None
    admitted: float | None = None
    first_token: float | None = None
    exit_cue: str | None = None
    exit_score: float | None = None


class EngineWorker:
    """Runs the engine on its own thread; `submit` and `abort` may be called from any thread."""

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        on_step: Callable[[Engine], None] | None = None,
        stream_interval_s: float = 0.0,
        max_chunk_rate: float = math.inf,
    ) -> None:
        self._engine_factory = engine_factory
        # Plain token events are posted at most every `stream_interval_s`, and less often under load so
        # that all requests together get about `max_chunk_rate` posts per second: the HTTP side then
        # costs the same whatever the concurrency, and the CPU it would take stays with the model.
        self.stream_interval_s = stream_interval_s
        self.max_chunk_rate = max_chunk_rate
        self._pending: dict[Ticket, list[Event]] = {}  # events not posted yet
        self._last_post = 0.0
        self.engine = engine_factory()
        self._on_step = on_step
        self._inbox: queue.SimpleQueue[tuple[str, Sequence[Ticket]]] = queue.SimpleQueue()
        self._tickets: dict[int, Ticket] = {}  # engine request id -> ticket
        self._post: Callable[[list[tuple[Ticket, list[Event]]]], None] = _deliver_all
        self._thread: threading.Thread | None = None
        self._expire_message = "the server is shutting down"
        # set once the engine has warmed every batch size (compiles and CUDA graph captures) and serves
        self.ready = threading.Event()
        self.warm_up_s = 0.0

    def start(self, post: Callable[[Callable[..., Any], Any], Any] | None = None) -> None:
        """Start the thread; `post(fn, arg)` runs `fn(arg)` where the handlers live (the event loop)."""
        if post is not None:
            self._post = lambda batch: post(_deliver_all, batch)
        self._thread = threading.Thread(target=self._run, name="lynx-exit-engine", daemon=True)
        self._thread.start()

    def submit(self, tickets: Sequence[Ticket]) -> None:
        self._inbox.put(("add", list(tickets)))

    def abort(self, tickets: Sequence[Ticket]) -> None:
        self._inbox.put(("abort", list(tickets)))

    def expire(self, message: str) -> None:
        """Fail every request still running or queued (with a 503), and keep the thread running."""
        self._expire_message = message
        self._inbox.put(("expire", []))

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is still running and end the thread."""
        self._inbox.put(("stop", []))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------------
    def _warm_up(self) -> None:
        """Compile and capture every batch size before the server reports ready (a no-op when eager)."""
        try:
            self.warm_up_s = self.engine.warm_up()
        except Exception as exc:  # a server that cannot warm up still serves: the first steps compile
            logger.warning("warm-up failed (%s: %s); steps compile as they come", type(exc).__name__, exc)
            self.engine = self._engine_factory()
        else:
            if self.warm_up_s:
                logger.info(
                    "warmed up every batch size up to %d in %.1f s",
                    self.engine.max_batch_size,
                    self.warm_up_s,
                )
        self.ready.set()

    def _run(self) -> None:
        self._warm_up()
        while self._drain(block=not self.engine.has_unfinished()):
            try:
                steps = self.engine.step()
            except Exception as exc:  # the engine contains a request's own faults; this one is the engine's
                logger.error(
                    "engine step failed (%s: %s); failing the running requests and starting a fresh engine",
                    type(exc).__name__,
                    exc,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
                self._fail_all(f"the engine failed: {type(exc).__name__}: {exc}")
                self.engine = self._engine_factory()
                if self._on_step is not None:  # gauges describe the fresh engine, not the failed one
                    self._on_step(self.engine)
                continue
            self._dispatch(steps)
            if self._on_step is not None:
                self._on_step(self.engine)
        self._fail_all("the server is shutting down", status=503, code="shutting_down")

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if `block`); False once asked to stop."""
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, tickets = command
            if kind == "stop":
                return False
            if kind == "expire":
                for engine_id in list(self._tickets):
                    self.engine.abort(engine_id)
                    self.engine.result(engine_id, forget=True)
                self._fail_all(self._expire_message, status=503, code="shutting_down")
                tickets = []
            for ticket in tickets:
                if kind == "add":
                    self._add(ticket)
                elif ticket.engine_id in self._tickets:
                    self.engine.abort(ticket.engine_id)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, ticket: Ticket) -> None:
        try:
            ticket.engine_id = self.engine.add_request(
                ticket.prompt_ids,
                ticket.config,
                ticket.policy,
                seed=ticket.seed,
                thinking=ticket.thinking,
                assist=ticket.assist,
            )
        except Exception as exc:  # validated by the handler already; kept so a client always hears back
            self._post([(ticket, [Failure(f"the engine refused this request: {exc}")])])
            return
        self._tickets[ticket.engine_id] = ticket

    def _dispatch(self, steps: list[Step]) -> None:
        """Turn steps into events; post them at once for a first token or a finish, else once per interval."""
        now = time.perf_counter()
        urgent = False
        for step in steps:
            ticket = self._tickets.get(step.request_id)
            if ticket is None:
                continue
            events = self._pending.setdefault(ticket, [])
            if ticket.admitted is None:
                ticket.admitted = now
            if step.phase != "end" and ticket.first_token is None:
                ticket.first_token, urgent = now, True
            if step.exit:
                ticket.exit_cue, ticket.exit_score = step.cue, step.score
            if step.text and not (step.exit and step.point == "cue"):  # an exit drops its cue token
                last = events[-1] if events else None
                if isinstance(last, TokenEvent) and last.phase == step.phase:
                    last.text += step.text  # one event per phase run: fewer objects, fewer and larger chunks
                else:
                    events.append(TokenEvent(step.text, step.phase))
            if ticket.points and step.point is not None and step.phase == "think":
                events.append(point_event(ticket.policy, step))
            if step.finish_reason == "error":  # this request alone failed; the engine went on with the others
                del self._tickets[step.request_id]
                self.engine.result(step.request_id, forget=True)
                events.append(Failure(f"the engine failed on this request: {step.error}"))
                urgent = True
            elif step.finish_reason is not None:
                del self._tickets[step.request_id]
                events.append(self._finish(ticket, now))
                urgent = True
        interval = max(self.stream_interval_s, len(self._tickets) / self.max_chunk_rate)
        if self._pending and (urgent or now - self._last_post >= interval):
            batch = [(ticket, events) for ticket, events in self._pending.items() if events]
            self._pending = {}
            self._last_post = now
            if batch:
                self._post(batch)

    def _finish(self, ticket: Ticket, now: float) -> Finish:
        assert ticket.engine_id is not None
        result = self.engine.result(ticket.engine_id, forget=True)
        admitted = ticket.admitted if ticket.admitted is not None else now
        return Finish(
            result=result,
            exit_cue=ticket.exit_cue,
            exit_score=ticket.exit_score,
            first_token_s=None if ticket.first_token is None else ticket.first_token - ticket.submitted,
            queued_s=admitted - ticket.submitted,
        )

    def _fail_all(self, message: str, status: int = 500, code: str = "engine_error") -> None:
        failure = Failure(message, status, code)
        failed: list[tuple[Ticket, list[Event]]] = [(ticket, [failure]) for ticket in self._tickets.values()]
        self._tickets.clear()
        self._pending.clear()
        while True:  # tickets submitted but never added
            try:
                kind, tickets = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                failed += [(ticket, [failure]) for ticket in tickets]
        if failed:
            self._post(failed)


def point_event(policy: ExitPolicy | None, step: Step) -> PointEvent:
    """A decision point as the stream reports it, with the thresholds the policy held its score against."""
    thresholds = getattr(policy, "thresholds", None)
    exit_at, give_up = thresholds(step.point) if callable(thresholds) else (None, None)
    return PointEvent(
        step.point or "", step.index, step.cue, step.score, exit_at, give_up, step.exit, step.gave_up
    )


def _deliver_all(batch: list[tuple[Ticket, list[Event]]]) -> None:
    for ticket, events in batch:
        ticket.deliver(ticket.choice, events)
