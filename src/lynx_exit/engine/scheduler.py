"""The scheduler: which requests wait and which run, admission to a batch row, the prefill token budget, and
what ending a request frees (its rows, its cache, the compaction that keeps decode batches dense)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import torch

from lynx_exit.engine.backend import Backend, fits, token_budget
from lynx_exit.engine.request import Request, describe_error
from lynx_exit.engine.types import FinishReason, Step

logger = logging.getLogger(__name__)

# Prompt tokens read per engine step, over all joining requests: a longer prompt is read in chunks over
# several steps while the running requests keep decoding (vLLM's chunked prefill; its default budget is
# 2,048-8,192).
DEFAULT_PREFILL_TOKENS = 2048

Chunk = tuple[Request, list[int]]


class Scheduler:
    """Waiting and running requests over one backend (and the plug-ins' backends, told through `on_free`)."""

    def __init__(
        self,
        backend: Backend,
        hidden_size: int,
        device: torch.device,
        max_batch_size: int,
        prefill_tokens_per_step: int,
    ) -> None:
        self.backend = backend
        self.hidden_size = hidden_size
        self.device = device
        self.max_batch_size = max_batch_size
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.requests: dict[int, Request] = {}
        self.waiting: deque[int] = deque()
        self.running: list[int] = []  # request ids holding a batch row, in admission order
        self.outbox: list[Step] = []  # steps produced outside the step's own flow (aborts, failures)
        self.layers: tuple[int, ...] = ()  # union of the running requests' layers, as captured
        self.freed = False  # a row was released since the last compaction
        self.held: set[int] = set()  # finished requests whose cache is kept (`hold`) until they are released
        self.preemptions = 0  # running requests whose cache was freed for the older ones (recomputed later)
        # Plug-ins: free what they hold for a request (force: even a held one); compact their own caches.
        self.on_free: list[Callable[[Request, bool], bool]] = []
        self.on_compact: list[Callable[[bool], None]] = []

    # -- records -------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request.request_id)

    def get(self, request_id: int) -> Request:
        if request_id not in self.requests:
            raise KeyError(f"unknown request id {request_id}")
        return self.requests[request_id]

    def running_requests(self) -> list[Request]:
        return [self.requests[r] for r in self.running]

    def take_outbox(self) -> list[Step]:
        steps, self.outbox = self.outbox, []
        return steps

    # -- admission and the prefill budget ----------------------------------------------------------------
    def admit(self) -> list[Request]:
        """Give waiting requests free rows, first come first served, while the KV cache has room (`has_room`);
        a request that fits the budget alone waits until memory frees."""
        admitted = []
        while (
            self.waiting
            and len(self.running) < self.max_batch_size
            and self.has_room(self.requests[self.waiting[0]])
        ):
            request = self.requests[self.waiting.popleft()]
            self.running.append(request.request_id)
            request.in_cache = True
            admitted.append(request)
        if admitted:
            self.update_layers()
        return admitted

    def check_fits_alone(self, request: Request) -> None:
        """A request that cannot fit the whole KV cache budget alone is refused at once (one that fits waits
        its turn)."""
        budget = token_budget(self.backend)
        if budget is not None and request.need > budget:
            raise ValueError(
                f"the prompt ({len(request.prompt_ids)} tokens) and max_new_tokens "
                f"({request.config.max_new_tokens}, with room for an exit's cue and answer) need "
                f"{request.need} "
                f"tokens of KV cache; the cache budget holds {budget} (raise --kv-cache-gb or lower "
                "max_tokens)"
            )

    def has_room(self, request: Request) -> bool:
        """A new request: room as the cache holds now (growth later preempts the youngest, as vLLM does). A
        preempted one: room for it and every running request at their largest, so it runs to its end this
        time."""
        if token_budget(self.backend) is None:
            return True
        holding = [self.requests[r] for r in (*self.running, *self.held)]
        if request.restoring:
            longest = max([request.need] + [r.need if r.finish_reason is None else r.length for r in holding])
        else:
            longest = max([len(request.prompt_ids) + 1] + [r.length + 1 for r in holding])
        return fits(self.backend, len(holding) + 1, longest)

    def preempt(self) -> Request | None:
        """Free the cache of the youngest running request that can be recomputed; it waits at the head of the
        queue with its tokens, feed and generator as they were (a plug-in's request is never preempted)."""
        for request_id in reversed(self.running):
            request = self.requests[request_id]
            if request.assist is not None or request.finish_reason is not None:
                continue
            self.running.remove(request_id)
            if request.in_cache:
                request.in_cache = False
                self.backend.release(request_id)
                self.freed = True
            request.restoring, request.read = request.feed >= 0 or bool(request.kept_ids), 0
            self.waiting.appendleft(request_id)
            self.preemptions += 1
            return request
        return None

    def prompt_chunks(self) -> tuple[list[Chunk], list[Chunk]]:
        """The next chunk of every prompt still being read, in admission order, within the step's token budget
        (the first request always gets at least one token): (first chunks, later chunks)."""
        budget = self.prefill_tokens_per_step
        first: list[Chunk] = []
        more: list[Chunk] = []
        for request in self.running_requests():
            tokens = request.to_read
            left = len(tokens) - request.read
            if left <= 0 or request.finish_reason is not None or budget <= 0:
                continue
            take = min(left, budget)
            budget -= take
            (first if request.read == 0 else more).append(
                (request, tokens[request.read : request.read + take])
            )
        return first, more

    # -- ending --------------------------------------------------------------------------------------
    @staticmethod
    def end_step(request: Request, token_id: int, reason: FinishReason) -> Step:
        return Step(
            request_id=request.request_id,
            index=request.index,
            token_id=token_id,
            text="",
            phase="end",
            finish_reason=reason,
        )

    def close(self, request: Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        request.wall_time_s = time.perf_counter() - request.started if request.started else 0.0
        if request.reasoning_tokens is None and request.phase == "think":
            request.reasoning_tokens = len(request.kept_ids)
        if request.request_id in self.running:
            self.running.remove(request.request_id)
        self.free(request, force=False)
        if request.in_cache:
            self.held.add(request.request_id)

    def finish(self, request: Request, token_id: int, reason: FinishReason) -> list[Step]:
        self.close(request, reason)
        return [self.end_step(request, token_id, reason)]

    def fail(self, request: Request, exc: BaseException) -> None:
        """End one request with finish_reason "error"; the rest of the batch is untouched."""
        if request.finish_reason is not None:
            return
        logger.warning("request %d failed and was ended alone: %s", request.request_id, describe_error(exc))
        request.error = exc
        if request.request_id in self.waiting:
            self.waiting.remove(request.request_id)
        self.close(request, "error")
        step = self.end_step(request, -1, "error")
        step.error = describe_error(exc)
        self.outbox.append(step)

    def abort(self, request: Request) -> None:
        if request.request_id in self.waiting:
            self.waiting.remove(request.request_id)
        self.close(request, "abort")
        self.outbox.append(self.end_step(request, -1, "abort"))

    def free(self, request: Request, force: bool) -> None:
        if request.in_cache and (force or not request.hold):
            request.in_cache = False
            self.backend.release(request.request_id)
            self.freed = True
            self.held.discard(request.request_id)
        for free in self.on_free:
            self.freed = free(request, force) or self.freed

    def after_step(self) -> None:
        if self.freed:  # trim columns now; drop free rows only if no waiting request will take them
            self.backend.compact(drop_rows=not self.waiting)
            for compact in self.on_compact:
                compact(not self.waiting)
            self.freed = False
        if not self.running and self.layers:
            self.update_layers()

    def update_layers(self) -> None:
        """Hook the union of the running requests' layers; give each request its own columns of it."""
        running = self.running_requests()
        union = tuple(sorted({layer for r in running for layer in r.layers}))
        if union != self.layers:
            self.backend.capture(union)
            self.layers = union
        hidden = self.hidden_size
        for request in running:
            if request.layers in ((), union):
                request.feature_columns = None
            else:
                starts = [union.index(layer) * hidden for layer in request.layers]
                request.feature_columns = torch.cat([torch.arange(s, s + hidden) for s in starts]).to(
                    self.device
                )
