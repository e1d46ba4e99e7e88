"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lynx_exit.engine import Engine

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60)


class ServerMetrics:
    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.max_batch_size = max_batch_size
        r = self.registry
        self.requests = Counter(
            "lynx_exit_requests",
            "HTTP requests to the API by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "lynx_exit_generated_tokens", "tokens generated (thinking, exit cue and answer)", registry=r
        )
        self.reasoning_tokens = Counter(
            "lynx_exit_reasoning_tokens", "tokens generated before the end of thinking", registry=r
        )
        self.saved_tokens = Counter(
            "lynx_exit_saved_tokens",
            "thinking tokens left in max_tokens when a policy exited (an upper bound on what the exit saved)",
            registry=r,
        )
        self.exits = Counter(
            "lynx_exit_exits",
            "choices whose thinking an exit method stopped, by method",
            ["method"],
            registry=r,
        )
        self.exit_points = Counter(
            "lynx_exit_exit_points",
            "exits by decision point kind ('other': at no decision point) and whether the exit was a give-up",
            ["point", "give_up"],
            registry=r,
        )
        self.choices = Counter(
            "lynx_exit_choices", "finished choices by finish reason", ["finish_reason"], registry=r
        )
        self.queue_depth = Gauge(
            "lynx_exit_queue_depth", "requests waiting for a batch row (or for KV cache)", registry=r
        )
        self.preemptions = Counter(
            "lynx_exit_preemptions",
            "running requests whose KV cache was freed for older ones (recomputed when memory frees)",
            registry=r,
        )
        self._preempted = 0  # the engine's count at the last step
        self.running = Gauge("lynx_exit_running", "requests holding a batch row", registry=r)
        self.batch_occupancy = Gauge(
            "lynx_exit_batch_occupancy", "running requests / max batch size", registry=r
        )
        self.latency = Histogram(
            "lynx_exit_request_latency_seconds",
            "time from submission to the last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lynx_exit_time_to_first_token_seconds",
            "time from submission to the first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )

    def observe_engine(self, engine: Engine) -> None:
        """Called by the engine thread after each step."""
        self.queue_depth.set(engine.num_waiting)
        count = engine.scheduler.preemptions
        self.preemptions.inc(
            count - self._preempted if count >= self._preempted else count
        )  # a new engine counts anew
        self._preempted = count
        self.running.set(engine.num_running)
        self.batch_occupancy.set(engine.num_running / self.max_batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
