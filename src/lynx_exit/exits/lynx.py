"""The LYNX exit policy (how-it-works §6): a probe scores the hidden state at each decision point; a conformal
rule decides.

Decision points are cue words by default (the paper's); a request may enable stated answers and paragraph ends
too (`decision_points`), each scored by the probe as its own kind. The event mode applies the threshold
calibrated for the point's kind; the trajectory and harm modes the one threshold calibrated for the enabled
kinds together. An optional give-up threshold (`give_up_delta`) stops a trace the probe judges lost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lynx_exit.decision_points import DEFAULT_POINTS, exit_prefix_value, parse_points
from lynx_exit.engine.types import Decision, Scorer, Step
from lynx_exit.exits.registry import (
    BasePolicy,
    ExitMethod,
    ExitSettingError,
    Knob,
    MethodContext,
    Option,
    choice_option,
    register,
)
from lynx_exit.models import FeatureSpec
from lynx_exit.probe import ProbeBundle, ProbeScorer
from lynx_exit.probe.conformal import EventThreshold, GiveUpThreshold, TrajectoryThreshold

MODES = ("event", "trajectory", "harm")


@dataclass
class LynxPolicy(BasePolicy):
    """At each decision point, score the hooked hidden state with the probe and apply the conformal rule."""

    bundle: ProbeBundle = field(default=None)  # type: ignore[assignment]
    delta: float = 0.05
    # "event": per-event split conformal (the paper); "trajectory": Learn-then-Test on the first exit
    # being premature; "harm": Learn-then-Test on the first exit turning a right chain wrong.
    mode: str = "event"
    scorer: Scorer | None = None
    feature_spec: FeatureSpec | None = None  # the probe's: set from the bundle
    name: str = "lynx"
    decision_points: tuple[str, ...] = DEFAULT_POINTS
    give_up_delta: float | None = None  # None: never give up
    exit_prefix: str | None = (
        None  # what an exit keeps (`decision_points.EXIT_PREFIXES`); None: the probe's labels'
    )

    def __post_init__(self) -> None:
        if self.bundle is None:
            raise ValueError("LynxPolicy needs a probe bundle")
        self.exit_prefix = exit_prefix_value(self.exit_prefix or self.bundle.exit_prefix)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        self.decision_points = parse_points(list(self.decision_points))
        self.bundle.check_points(self.decision_points)
        points = self.decision_points
        self.rules: dict[str, EventThreshold | TrajectoryThreshold] = {}
        for kind in points:
            if self.mode == "event":
                self.rules[kind] = self.bundle.event_threshold(self.delta, kind)
            else:
                pick = (
                    self.bundle.trajectory_threshold
                    if self.mode == "trajectory"
                    else self.bundle.harm_threshold
                )
                self.rules[kind] = pick(self.delta, points)  # one rule over all enabled kinds
        self.give_up: GiveUpThreshold | None = None
        if self.give_up_delta is not None:
            self.give_up = self.bundle.give_up_threshold(self.give_up_delta, points)
        if self.scorer is None:
            self.scorer = ProbeScorer(self.bundle.probe)
        self.feature_spec = self.bundle.spec
        self.scores: list[float] = []

    def reset(self) -> None:
        self.scores = []

    def thresholds(self, point: str) -> tuple[float | None, float | None]:
        """(the P(safe) an exit needs at a point of this kind, the give-up threshold); None where there is
        none."""
        rule = self.rules.get(point)
        if rule is None:
            return None, None
        if isinstance(rule, EventThreshold):
            exit_at = None if rule.never_exit else max(1 - rule.q_pos, rule.q_neg)
        else:
            exit_at = None if rule.never_exit else rule.threshold
        give_up = None if self.give_up is None or self.give_up.never else self.give_up.threshold
        return exit_at, give_up

    def observe(self, step: Step) -> Decision:
        if step.point not in self.rules or step.features is None:
            return Decision.CONTINUE
        if step.score is not None:
            prob = step.score
        else:
            prob = float(self.bundle.probe.prob_safe(step.features[None], [step.point])[0])
        self.scores.append(prob)
        rule = self.rules[step.point]
        exit_now = rule.should_exit(prob) if isinstance(rule, EventThreshold) else prob >= rule.threshold
        if exit_now:
            return Decision.EXIT
        if self.give_up is not None and self.give_up.should_give_up(prob, step.index):
            return Decision.GIVE_UP
        return Decision.CONTINUE


def _delta(text: str) -> dict[str, Any]:
    value = float(text)
    if not (math.isfinite(value) and 0 < value < 1):
        raise ValueError("δ must be in (0, 1)")
    return {"delta": value}


def give_up_delta_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number in (0, 1), got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number in (0, 1), got {value!r}") from None
    if not (math.isfinite(number) and 0 < number < 1):
        raise ValueError(f"must be in (0, 1), got {value!r}")
    return number


def _build(context: MethodContext, options: dict[str, Any]) -> LynxPolicy:
    bundle, scorer = context.loaded_probe()
    mode = options.get("mode", "event")
    if mode not in MODES:
        raise ValueError(f"lynx mode must be one of {', '.join(MODES)}, got {mode!r}")
    points = options.get("decision_points")
    if points is None:
        points = context.lm.profile.decision_points if context.lm is not None else DEFAULT_POINTS
    give_up = options.get("give_up_delta")
    try:
        bundle.check_points(tuple(points))
    except ValueError as exc:
        raise ExitSettingError("exit.decision_points", str(exc)) from None
    if give_up is not None:
        try:
            bundle.give_up_threshold(float(give_up), tuple(points))
        except ValueError as exc:
            raise ExitSettingError("exit.give_up_delta", str(exc)) from None
    return LynxPolicy(
        bundle=bundle,
        delta=float(options["delta"]),
        mode=mode,
        scorer=scorer,
        decision_points=tuple(points),
        give_up_delta=None if give_up is None else float(give_up),
        exit_prefix=options.get("exit_prefix"),
    )


LYNX_OPTIONS = (
    choice_option("mode", MODES, "conformal mode"),
    Option(
        "decision_points",
        parse_points,
        "decision point kinds, comma-separated: cue (default), answer, paragraph",
    ),
    Option(
        "give_up_delta",
        give_up_delta_value,
        "give up on a trace judged lost; risk of giving up on one that would have "
        "ended right ≤ this δ (default: never give up)",
    ),
    Option(
        "exit_prefix",
        exit_prefix_value,
        "what an exit keeps: point (the paper's: a cue is dropped) or lookahead "
        "(the token after the point too, as in vLLM); default: the probe's labels'",
    ),
)


DELTA = Knob(
    "delta",
    "--delta",
    "--deltas",
    _delta,
    "LYNX risk level δ (confidence 1 - δ)",
    default="0.05",
    default_grid="0.05,0.1,0.2,0.3",
)
register(
    ExitMethod(
        "lynx",
        "probe at each decision point + conformal threshold (mode by --mode)",
        _build,
        knob=DELTA,
        options=LYNX_OPTIONS,
        needs_probe=True,
    )
)
for _mode in MODES:
    register(
        ExitMethod(
            f"lynx-{_mode}",
            f"lynx with mode {_mode}",
            _build,
            knob=DELTA,
            fixed=(("mode", _mode),),
            options=LYNX_OPTIONS[1:],
            needs_probe=True,
        )
    )
register(
    ExitMethod(
        "speculative-thinking+lynx",
        "the assistant writes the reflective steps; lynx decides the exit on the thinker's states",
        _build,
        knob=DELTA,
        options=LYNX_OPTIONS,
        needs_probe=True,
        assisted=True,
    )
)
