"""Record types shared by the engine, the exit methods and every front end.

They live in their own module so that the engine (below) and the exit methods (above) can
both import them without a cycle.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from lynx_exit.models import FeatureSpec

Phase = Literal["think", "answer", "exit_cue", "forced_answer", "end"]
FinishReason = Literal[
    "eos", "length", "exit", "abort", "error"
]  # "error": this request alone failed (`error` says why)
# A trial decode from the current point: "answer" = the exit cue and a greedy answer (DEER, Dynasor);
# "entropy" = the exit cue alone, to read the entropy of the answer's first token (EAT).
TrialKind = Literal["answer", "entropy"]


class Decision(enum.Enum):
    CONTINUE = "continue"
    EXIT = "exit"
    GIVE_UP = "give_up"  # an exit too (the answer is forced), on a trace judged to end wrong anyway


@dataclass
class ForcedAnswer:
    """Greedy answer after forced tokens (an exit cue); `mean_prob` is the mean probability of its tokens.

    `forced_tokens` is how many tokens were forced before it and `entropy` the entropy (nats) of the
    next-token distribution right after them: a trial costs `forced_tokens + len(token_ids)` tokens.
    """

    token_ids: list[int]
    text: str
    answer: str | None
    mean_prob: float
    forced_tokens: int = 0
    entropy: float | None = None

    @property
    def cost(self) -> int:
        return self.forced_tokens + len(self.token_ids)


@dataclass(slots=True)
class Step:
    """One token of one request, reported after the model has read it."""

    request_id: int
    index: int  # position among the request's generated tokens, 0-based
    token_id: int
    text: str  # text this token adds (may be "" for a partial multi-byte character)
    phase: Phase  # "answer" = after a natural end of thinking; "end" = a closing step without a token
    cue: str | None = None  # cue word this token completes
    point: str | None = None  # the decision point kind this token completes, of the request's enabled kinds
    features: torch.Tensor | None = (
        # [feature_dim] float32 hidden state of this token: at decision points for a policy, every
        # step if asked
        None
    )
    score: float | None = (
        None  # the policy's batched score of `features` at a decision point (e.g. LYNX's P(safe))
    )
    exit: bool = False  # the policy exited here (a cue point's token is dropped from the output)
    gave_up: bool = False  # ... and the exit was a give-up
    finish_reason: FinishReason | None = None  # on the request's last step
    fork: Callable[[], ForcedAnswer] | None = field(
        default=None, repr=False
    )  # trial forced exit from this point
    trial: ForcedAnswer | None = (
        None  # the trial the policy asked for here (`trial_at`), decoded with all rows' at once
    )
    confidence: float | None = None  # DeepConf token confidence, if the policy asks (`confidence_top_k`)
    error: str | None = None  # with finish_reason "error": what failed
    assist: dict[str, Any] | None = None  # Speculative Thinking: tokens each model wrote and read, takeovers


@runtime_checkable
class Scorer(Protocol):
    """Scores many feature rows in one call (a probe); shared by the policies that use it."""

    def __call__(self, features: torch.Tensor, points: list[str] | None = None) -> torch.Tensor:
        """[n, feature_dim] on the model's device, and each row's decision point kind -> [n] scores."""
        ...


@runtime_checkable
class ExitPolicy(Protocol):
    """Decides, one thinking step at a time, whether to stop thinking and answer.

    Everything the engine and the evaluation harness read from a policy is declared here:
    - `decision_points`: the kinds of decision point (`lynx_exit.decision_points`) the engine finds for it and
      names in `Step.point`: "cue" (the paper's cue words), "answer", "paragraph".
    - `feature_spec`: the hidden-state layers it reads (None: no features). The engine hooks
      them, checks them against the model when the request is added, and gives the policy
      exactly these layers in `Step.features` at every decision point (LYNX scores only those).
    - `scorer`: if set, the engine scores the features of all decision points of one decode step in
      one batched call and puts each result in `Step.score` before `observe`.
    - `banned_token_ids`: tokens masked out while thinking (NoWait-style logit bias).
    - `trial_tokens`: tokens this sequence has spent on trial decodes so far.
    - `confidence_top_k`: if > 0, each thinking step's `Step.confidence` is the negative mean
      log-probability of the k most likely tokens where that token was sampled (DeepConf).
    - `trial_at(step)`: the trial decode wanted at this thinking step, if any; the engine decodes
      the trials of all rows of a step in one batched fork and puts each in `Step.trial` before
      `observe`. (`Step.fork` still runs a single trial on demand.) A policy that never asks one may say so
      with `asks_trials = False` (optional; `BasePolicy` works it out): the engine then does not call it.
    `observe` sees every thinking-phase step of one sequence (a decision point or not); `reset` starts a
    new one. It returns EXIT to answer now, GIVE_UP to answer now on a trace it judges lost (reported as a
    give-up)."""

    name: str
    decision_points: tuple[str, ...]
    feature_spec: FeatureSpec | None
    scorer: Scorer | None
    banned_token_ids: frozenset[int]
    trial_tokens: int
    confidence_top_k: int

    def reset(self) -> None: ...

    def trial_at(self, step: Step) -> TrialKind | None: ...

    def observe(self, step: Step) -> Decision: ...


@dataclass
class RequestResult:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens kept in the output (a dropped cue token is not)
    text: str
    finish_reason: FinishReason
    exit_index: int | None  # step index where the policy exited, None if it never did
    cue_indices: list[int]
    answer: str | None
    wall_time_s: float
    reasoning_tokens: int  # generated tokens before the end of thinking (natural or forced)
    error: str | None = None  # with finish_reason "error": what failed
    assist: dict[str, Any] | None = None  # Speculative Thinking: tokens each model wrote and read, takeovers
    exit_point: str | None = None  # the decision point kind of the exit ("cue", "answer", "paragraph")
    gave_up: bool = False  # the exit was a give-up (the policy judged the trace lost)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)
