"""Baseline exit methods (spec §9), siblings of LYNX behind the ExitPolicy protocol.

Trial decodes use the loop's `Step.fork` (a forced exit from the same KV cache that leaves
the main generation untouched); their tokens are counted in `trial_tokens`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lynx_exit.cues import DEFAULT_CUE_WORDS
from lynx_exit.policies import Decision, register_policy

if TYPE_CHECKING:
    from lynx_exit.decode import ForcedAnswer, Step


def _trial(step: Step) -> ForcedAnswer:
    if step.fork is None:
        raise RuntimeError("this exit method needs trial decodes, but the step carries no fork")
    return step.fork()


@dataclass
class DeerPolicy:
    """DEER-style: at each cue, trial-decode an answer; exit if its mean token probability ≥ λ."""

    threshold: float
    exit_cue_tokens: int = 0  # added to each trial's cost
    name: str = "deer"
    needs_features: bool = False
    trial_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"deer threshold λ must be in (0, 1], got {self.threshold}")

    def reset(self) -> None:
        self.trial_tokens = 0

    def observe(self, step: Step) -> Decision:
        if step.cue is None:
            return Decision.CONTINUE
        trial = _trial(step)
        self.trial_tokens += self.exit_cue_tokens + len(trial.token_ids)
        return Decision.EXIT if trial.answer is not None and trial.mean_prob >= self.threshold else Decision.CONTINUE


@dataclass
class DynasorPolicy:
    """Dynasor-CoT-style: every `interval` thinking tokens probe an answer; exit when the last `window` agree."""

    interval: int
    window: int = 3
    exit_cue_tokens: int = 0
    name: str = "dynasor"
    needs_features: bool = False
    trial_tokens: int = 0
    _answers: deque[str | None] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.interval < 1 or self.window < 2:
            raise ValueError(f"dynasor needs interval >= 1 and window >= 2, got {self.interval}, {self.window}")

    def reset(self) -> None:
        self.trial_tokens = 0
        self._answers = deque(maxlen=self.window)

    def observe(self, step: Step) -> Decision:
        if (step.index + 1) % self.interval:
            return Decision.CONTINUE
        trial = _trial(step)
        self.trial_tokens += self.exit_cue_tokens + len(trial.token_ids)
        self._answers.append(trial.answer)
        agreed = len(self._answers) == self.window and len(set(self._answers)) == 1 and self._answers[0] is not None
        return Decision.EXIT if agreed else Decision.CONTINUE


@dataclass
class NoWaitPolicy:
    """NoWait-style: never exits, but the loop bans the cue words' tokens while thinking."""

    banned_token_ids: frozenset[int] = frozenset()
    name: str = "nowait"
    needs_features: bool = False

    def reset(self) -> None:
        pass

    def observe(self, step: Step) -> Decision:
        return Decision.CONTINUE


def cue_token_ids(tokenizer: Any, words: tuple[str, ...] = DEFAULT_CUE_WORDS) -> frozenset[int]:
    """Vocabulary entries that spell a cue word (any case, with or without a leading space)."""
    targets = {w.lower() for w in words}
    banned = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id]).strip().lower()
        if text in targets:
            banned.add(token_id)
    return frozenset(banned)


register_policy("deer", lambda threshold, exit_cue_tokens=0: DeerPolicy(float(threshold), int(exit_cue_tokens)))
register_policy(
    "dynasor",
    lambda interval, window=3, exit_cue_tokens=0: DynasorPolicy(int(interval), int(window), int(exit_cue_tokens)),
)
register_policy("nowait", lambda banned_token_ids=frozenset(): NoWaitPolicy(frozenset(banned_token_ids)))
