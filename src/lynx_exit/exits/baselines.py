"""Baseline exit methods (how-it-works §9), siblings of LYNX behind the ExitPolicy protocol.

Methods that need a trial decode say so in `trial_at`; the engine decodes the trials of all rows
of a step in one batched fork (from the same KV cache, leaving the main generation untouched) and
hands each policy its `Step.trial`. Every trial's tokens, forced ones included, are counted in
`trial_tokens`.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lynx_exit.cues import DEFAULT_CUE_WORDS
from lynx_exit.decision_points import DEFAULT_ANSWER_PHRASE
from lynx_exit.engine.types import Decision, ForcedAnswer, Step, TrialKind
from lynx_exit.exits.registry import (
    MAX_TOKENS,
    MAX_WINDOW,
    BasePolicy,
    ExitMethod,
    Knob,
    MethodContext,
    Option,
    positive_int,
    register,
    whole_number,
    window_option,
)
from lynx_exit.tasks.grading import extract_boxed


def _trial(step: Step) -> ForcedAnswer:
    """The step's trial: decoded by the engine in its batch, else (offline replay) by the step's own fork."""
    if step.trial is not None:
        return step.trial
    if step.fork is None:
        raise RuntimeError(
            "this exit method needs trial decodes, but the step carries neither a trial nor a fork"
        )
    return step.fork()


@dataclass
class DeerPolicy(BasePolicy):
    """DEER-style: at each cue, trial-decode an answer; exit if its mean token probability ≥ λ."""

    threshold: float = 0.9
    name: str = "deer"
    trial_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"deer threshold λ must be in (0, 1], got {self.threshold}")

    def trial_at(self, step: Step) -> TrialKind | None:
        return "answer" if step.cue is not None else None

    def observe(self, step: Step) -> Decision:
        if step.cue is None:
            return Decision.CONTINUE
        trial = _trial(step)
        self.trial_tokens += trial.cost
        return (
            Decision.EXIT
            if trial.answer is not None and trial.mean_prob >= self.threshold
            else Decision.CONTINUE
        )


@dataclass
class _AgreementPolicy(BasePolicy):
    """Trial answers at the steps `_due` picks; exit when the last `window` are the same answer."""

    window: int = 3
    trial_tokens: int = 0
    _answers: deque[str | None] = field(default_factory=deque)

    def _due(self, step: Step) -> bool:
        raise NotImplementedError

    def reset(self) -> None:
        self.trial_tokens = 0
        self._answers = deque(maxlen=self.window)

    def trial_at(self, step: Step) -> TrialKind | None:
        return "answer" if self._due(step) else None

    def observe(self, step: Step) -> Decision:
        if not self._due(step):
            return Decision.CONTINUE
        trial = _trial(step)
        self.trial_tokens += trial.cost
        self._answers.append(trial.answer)
        agreed = (
            len(self._answers) == self.window
            and len(set(self._answers)) == 1
            and self._answers[0] is not None
        )
        return Decision.EXIT if agreed else Decision.CONTINUE


@dataclass
class DynasorPolicy(_AgreementPolicy):
    """Dynasor-CoT-style: every `interval` thinking tokens probe an answer; exit when the last `window`
    agree."""

    interval: int = 32
    name: str = "dynasor"

    def __post_init__(self) -> None:
        if self.interval < 1 or self.window < 2:
            raise ValueError(
                f"dynasor needs interval >= 1 and window >= 2, got {self.interval}, {self.window}"
            )
        self.reset()

    def _due(self, step: Step) -> bool:
        return (step.index + 1) % self.interval == 0


@dataclass
class AnswerConvergencePolicy(_AgreementPolicy):
    """Dynasor's rule at cues: a trial answer at each cue; exit when the last `window` agree."""

    name: str = "answer-convergence"

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"answer-convergence needs at least 2 agreeing answers, got {self.window}")
        self.reset()

    def _due(self, step: Step) -> bool:
        return step.cue is not None


# "the answer is 42" with the number complete: followed by something that cannot continue it.
_STATED_ANSWER = re.compile(DEFAULT_ANSWER_PHRASE, re.IGNORECASE)


@dataclass
class FirstAnswerPolicy(BasePolicy):
    """First-Try-Matters-style: exit once the thinking holds a complete candidate answer, no trial decode.

    A candidate is a closed `\\boxed{…}` or "the answer is N" with N complete.
    """

    name: str = "first-answer"
    tail_chars: int = 200  # only this much recent thinking is searched (an answer is short)
    _tail: str = ""

    def reset(self) -> None:
        self.trial_tokens = 0
        self._tail = ""

    def observe(self, step: Step) -> Decision:
        if not step.text:
            return Decision.CONTINUE
        self._tail = (self._tail + step.text)[-self.tail_chars :]
        found = _STATED_ANSWER.search(self._tail) is not None or bool(extract_boxed(self._tail))
        return Decision.EXIT if found else Decision.CONTINUE


@dataclass
class EatPolicy(BasePolicy):
    """EAT-style (Entropy After `</think>`): at each cue (or every `every` tokens) a fork appends the
    exit cue (the thinking-end marker and the answer's opening, e.g. `</think> Final Answer: \\boxed{`)
    and reads the entropy H of the answer's first token; exit once an exponential moving variance of
    H (weight `alpha`) is below `variance`, after at least `min_trials` trials. (The paper reads H
    right after `</think>`; where a fixed phrase follows the marker, as in the exit cue, that token
    is certain and says nothing, so the cue is appended whole.)"""

    variance: float = 0.01
    every: int = 0  # 0: at cues
    alpha: float = 0.2
    min_trials: int = 3
    name: str = "eat"
    trial_tokens: int = 0
    _trials: int = 0
    _mean: float = 0.0
    _var: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.variance) and self.variance > 0):
            raise ValueError(f"eat variance threshold must be > 0, got {self.variance}")
        if not 0 < self.alpha <= 1 or self.every < 0 or self.min_trials < 2:
            raise ValueError(
                f"eat needs 0 < alpha <= 1, every >= 0, min_trials >= 2; got {self.alpha}, {self.every}, "
                f"{self.min_trials}"
            )

    def reset(self) -> None:
        self.trial_tokens, self._trials, self._mean, self._var = 0, 0, 0.0, 0.0

    def _due(self, step: Step) -> bool:
        return (step.index + 1) % self.every == 0 if self.every else step.cue is not None

    def trial_at(self, step: Step) -> TrialKind | None:
        return "entropy" if self._due(step) else None

    def observe(self, step: Step) -> Decision:
        if not self._due(step):
            return Decision.CONTINUE
        if step.trial is None or step.trial.entropy is None:
            raise RuntimeError("eat needs the engine's entropy trials (Step.trial), but this step has none")
        self.trial_tokens += step.trial.cost
        entropy = step.trial.entropy
        self._trials += 1
        if self._trials == 1:
            self._mean, self._var = entropy, 0.0
            return Decision.CONTINUE
        diff = entropy - self._mean
        self._mean += self.alpha * diff
        self._var = (1 - self.alpha) * (self._var + self.alpha * diff * diff)
        return (
            Decision.EXIT
            if self._trials >= self.min_trials and self._var < self.variance
            else Decision.CONTINUE
        )


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


def _deer(_context: MethodContext, options: dict[str, Any]) -> DeerPolicy:
    return DeerPolicy(threshold=float(options["threshold"]))


def _dynasor(_context: MethodContext, options: dict[str, Any]) -> DynasorPolicy:
    return DynasorPolicy(window=int(options.get("window", 3)), interval=int(options["interval"]))


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
        options["window"] = whole_number(window, 2, MAX_WINDOW)
    return options


def _agree(text: str) -> dict[str, Any]:
    return {"agree": whole_number(text, 2, MAX_WINDOW)}  # answers that must agree


def _variance(text: str) -> dict[str, Any]:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be > 0")
    return {"variance": value}


def _eat(_context: MethodContext, options: dict[str, Any]) -> EatPolicy:
    return EatPolicy(variance=float(options["variance"]), every=int(options.get("every", 0)))


register(
    ExitMethod(
        "deer",
        "trial answer at each cue; exit when its mean token probability >= λ",
        _deer,
        knob=Knob(
            "threshold",
            "--threshold",
            "--deer-thresholds",
            _threshold,
            "DEER confidence λ",
            default_grid="0.8,0.9,0.95",
        ),
    )
)
register(
    ExitMethod(
        "dynasor",
        "trial answer every K tokens; exit when the last M agree",
        _dynasor,
        knob=Knob(
            "interval",
            "--interval",
            "--dynasor",
            _interval,
            "Dynasor probe interval K (K:M sets the window M)",
            default_grid="32:3,64:2",
        ),
        options=(window_option("window", "trial answers that must agree (M)", low=2),),
    )
)
register(ExitMethod("nowait", "never exits; bans cue-word tokens while thinking", _nowait))
register(
    ExitMethod(
        "answer-convergence",
        "trial answer at each cue; exit when the last K agree",
        lambda _c, o: AnswerConvergencePolicy(window=int(o["agree"])),
        knob=Knob(
            "agree",
            "--agree",
            "--agree-counts",
            _agree,
            "answer-convergence: trial answers at cues that must agree",
            default_grid="2,3,4",
        ),
    )
)
register(
    ExitMethod(
        "first-answer",
        "exit once the thinking states a complete answer; no trial decode",
        lambda _c, _o: FirstAnswerPolicy(),
    )
)
register(
    ExitMethod(
        "eat",
        "entropy of the answer after the exit cue at each cue; exit when its moving variance < V",
        _eat,
        knob=Knob(
            "variance",
            "--eat-variance",
            "--eat-variances",
            _variance,
            "EAT: exit when the moving variance of the entropy after the exit cue falls below V",
            default_grid="0.001,0.01,0.05",
        ),
        options=(
            Option(
                "every",
                lambda value: whole_number(value, 0, MAX_TOKENS),
                "a trial every N thinking tokens instead of at cues (0: at cues)",
            ),
        ),
    )
)
