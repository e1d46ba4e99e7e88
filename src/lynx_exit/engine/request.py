"""One request's record in the engine, and the batch of rows one step samples for."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lynx_exit.cues import IncrementalDetokenizer
from lynx_exit.decision_points import PointDetector
from lynx_exit.engine.config import GenerationConfig
from lynx_exit.engine.sampler import SamplingParams
from lynx_exit.engine.types import ExitPolicy, FinishReason, Phase
from lynx_exit.models import LoadedModel


def brace_depth(text: str, depth: int) -> int:
    """Brace depth after `text`, starting at `depth`; 0 as soon as it closes."""
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth <= 0:
            return 0
    return depth


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def request_layers(
    lm: LoadedModel, policy: ExitPolicy | None, feature_layers: Sequence[int] | None
) -> tuple[int, ...]:
    """The hidden-state layers a request reads: its policy's (checked against the model's feature space, both
    sides named when they differ) or the ones asked for."""
    wanted = tuple(feature_layers) if feature_layers else ()
    if policy is None or policy.feature_spec is None:
        if wanted:
            lm.feature_spec(wanted)  # validates the range
        return wanted
    spec = policy.feature_spec
    if wanted and wanted != spec.layers:
        raise ValueError(
            f"exit method {policy.name!r} reads layers {list(spec.layers)} but layers {list(wanted)} were "
            "asked for"
        )
    spec.check_compatible(lm.feature_spec(spec.layers), what=f"exit method {policy.name!r}'s probe")
    return spec.layers


@dataclass
class Request:
    # -- what was asked ------------------------------------------------------------------------------
    request_id: int
    prompt_ids: list[int]
    config: GenerationConfig
    params: SamplingParams
    generator: torch.Generator | None
    policy: ExitPolicy | None
    asks_trials: bool  # whether the policy may ask trial decodes (`trial_at` is called at every step)
    layers: tuple[int, ...]  # hidden-state layers this request reads ((): none)
    every_step: bool  # features at every thinking step (asked with `feature_layers`), else at cues only
    detok: IncrementalDetokenizer
    detector: PointDetector
    exit_cue_ids: list[int]
    hold: bool  # keep the cache after finishing until `release` (forced-exit labelling)
    # -- where it is -------------------------------------------------------------------------------
    phase: Phase = "think"
    feed: int = -1  # token fed at the next forward pass (-1: none yet)
    index: int = -1  # generated index of `feed`
    # Tokens written instead of sampled ones, in order: the exit cue (phase "exit_cue"), or a recap sentence
    # while thinking (Speculative Thinking). One queue: an exit replaces whatever was queued.
    forced: deque[int] = field(default_factory=deque)
    in_cache: bool = False
    read: int = 0  # tokens of `to_read` in the cache (a long prompt is read over several steps)
    restoring: bool = False  # preempted: re-reads its prompt and kept tokens, then decodes `feed` as before
    feature_columns: torch.Tensor | None = None  # columns of the captured features that are this request's
    feed_confidence: float | None = None  # DeepConf confidence of `feed` where it was sampled
    candidate_confidence: float | None = None  # ... of the token sampled at this step
    # -- what it wrote -----------------------------------------------------------------------------
    kept_ids: list[int] = field(default_factory=list)
    text: str = ""
    answer_tokens: int = 0
    answer_depth: int = 1
    exit_index: int | None = None
    exit_point: str | None = None  # the decision point kind the exit was at
    gave_up: bool = False  # the exit was a give-up
    reasoning_tokens: int | None = None
    cue_indices: list[int] = field(default_factory=list)
    # -- how it ended ------------------------------------------------------------------------------
    finish_reason: FinishReason | None = None
    error: BaseException | None = None  # why it failed (finish_reason "error")
    started: float = 0.0
    wall_time_s: float = 0.0
    # A plug-in's state for this request (Speculative Thinking: who writes, and what each model did)
    assist: Any = None

    @property
    def to_read(self) -> list[int]:
        """What the request reads into a fresh cache: its prompt, or after a preemption everything it
        holds."""
        return self.prompt_ids + self.kept_ids if self.restoring else self.prompt_ids

    @property
    def length(self) -> int:
        """Tokens the request holds in the cache once it has read what it was fed."""
        return len(self.prompt_ids) + len(self.kept_ids) + (self.feed >= 0)

    @property
    def need(self) -> int:
        """The most tokens of KV cache this request can hold: its prompt, its budget and an exit's cue and
        answer."""
        return (
            len(self.prompt_ids)
            + self.config.max_new_tokens
            + len(self.exit_cue_ids)
            + self.config.answer_max_tokens
        )

    @property
    def sampling(self) -> bool:
        """Whether the next token is sampled with the request's own settings (else greedy: cue, forced
        answer)."""
        return self.phase in ("think", "answer")


@dataclass
class Batch:
    """The rows one step samples for, in the order of their logits: the rows that fed a token, then the rows
    that sample without one (an assistant taking over), then the rows whose whole prompt is now read."""

    fed: list[Request] = field(default_factory=list)
    resumed: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    parts: list[torch.Tensor] = field(default_factory=list)  # logits, one tensor per group of rows

    @property
    def rows(self) -> list[Request]:
        return self.fed + self.resumed + self.admitted

    def logits(self) -> torch.Tensor:
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)  # [rows, vocab]
