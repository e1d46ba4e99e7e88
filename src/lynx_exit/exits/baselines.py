"""Baseline exit methods (spec §9), siblings of LYNX behind the ExitPolicy protocol.

Trial decodes use the engine's `Step.fork` (a forced exit from the same KV cache that leaves
the main generation untouched); their tokens are counted in `trial_tokens`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lynx_exit.cues import DEFAULT_CUE_WORDS
from lynx_exit.engine.types import Decision, ForcedAnswer, Step
from lynx_exit.exits.basic import positive_int
from lynx_exit.exits.registry import BasePolicy, ExitMethod, Knob, MethodContext, register


def _trial(step: Step) -> ForcedAnswer:
    if step.fork is None:
        raise RuntimeError("this exit method needs trial decodes, but the step carries no fork")
    return step.fork()


@dataclass
class DeerPolicy(BasePolicy):
    """DEER-style: at each cue, trial-decode an answer; exit if its mean token probability ≥ λ."""

    threshold: float = 0.9
    exit_cue_tokens: int = 0  # added to each trial's cost
    name: str = "deer"
    trial_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"deer threshold λ must be in (0, 1], got {self.threshold}")

    def observe(self, step: Step) -> Decision:
        if step.cue is None:
            return Decision.CONTINUE
        trial = _trial(step)
        self.trial_tokens += self.exit_cue_tokens + len(trial.token_ids)
        return Decision.EXIT if trial.answer is not None and trial.mean_prob >= self.threshold else Decision.CONTINUE


@dataclass
class DynasorPolicy(BasePolicy):
    """Dynasor-CoT-style: every `interval` thinking tokens probe an answer; exit when the last `window` agree."""

    interval: int = 32
    window: int = 3
    exit_cue_tokens: int = 0
    name: str = "dynasor"
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
class NoWaitPolicy(BasePolicy):
    """NoWait-style: never exits, but the engine bans the cue words' tokens while thinking."""

    banned_token_ids: frozenset[int] = frozenset()
    name: str = "nowait"


def cue_token_ids(tokenizer: Any, words: tuple[str, ...] = DEFAULT_CUE_WORDS) -> frozenset[int]:
    """Vocabulary entries that spell a cue word (any case, with or without a leading space)."""
    targets = {w.lower() for w in words}
    banned = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id]).strip().lower()
        if text in targets:
            banned.add(token_id)
    return frozenset(banned)


def _exit_cue_tokens(context: MethodContext) -> int:
    return len(context.lm.exit_cue_ids()) if context.lm is not None else 0


def _deer(context: MethodContext, options: dict[str, Any]) -> DeerPolicy:
    return DeerPolicy(threshold=float(options["threshold"]), exit_cue_tokens=_exit_cue_tokens(context))


def _dynasor(context: MethodContext, options: dict[str, Any]) -> DynasorPolicy:
    return DynasorPolicy(int(options["interval"]), int(options.get("window", 3)), exit_cue_tokens=_exit_cue_tokens(context))


def _nowait(context: MethodContext, _options: dict[str, Any]) -> NoWaitPolicy:
    if "banned" not in context.shared:
        context.shared["banned"] = cue_token_ids(context.need_lm("nowait").tokenizer)
    return NoWaitPolicy(banned_token_ids=context.shared["banned"])


def _threshold(text: str) -> dict[str, Any]:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("must be in (0, 1]")
    return {"threshold": value}


def _interval(text: str) -> dict[str, Any]:
    interval, _, window = text.partition(":")
    options: dict[str, Any] = {"interval": positive_int(interval)}
    if window:
        options["window"] = int(window)
    return options


register(
    ExitMethod(
        "deer",
        "trial answer at each cue; exit when its mean token probability >= λ",
        _deer,
        knob=Knob("threshold", "--threshold", "--deer-thresholds", _threshold, "DEER confidence λ", default_grid="0.8,0.9,0.95"),
    )
)
register(
    ExitMethod(
        "dynasor",
        "trial answer every K tokens; exit when the last M agree",
        _dynasor,
        knob=Knob("interval", "--interval", "--dynasor", _interval, "Dynasor probe interval K (K:M sets the window M)",
                  default_grid="32:3,64:2"),
        options=("window",),
    )
)
register(ExitMethod("nowait", "never exits; bans cue-word tokens while thinking", _nowait))
