"""The LYNX exit policy (spec §6): a probe scores the hidden state at each cue; a conformal rule decides."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lynx_exit.engine.types import Decision, Scorer, Step
from lynx_exit.exits.registry import BasePolicy, ExitMethod, Knob, MethodContext, choice_option, register
from lynx_exit.models import FeatureSpec
from lynx_exit.probe import Probe, ProbeBundle, load_probe
from lynx_exit.probe.conformal import EventThreshold, TrajectoryThreshold
from lynx_exit.probe.sharing import locate_probe

MODES = ("event", "trajectory", "harm")


@dataclass(eq=False)
class ProbeScorer:
    """P(safe) of many feature rows in one call; one per loaded probe, shared by its policies."""

    probe: Probe

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.probe.prob_safe(features)


@dataclass
class LynxPolicy(BasePolicy):
    """At each cue, score the hooked hidden state with the probe and apply the conformal rule."""

    bundle: ProbeBundle = field(default=None)  # type: ignore[assignment]
    delta: float = 0.05
    # "event": per-event split conformal (the paper); "trajectory": Learn-then-Test on the first exit
    # being premature; "harm": Learn-then-Test on the first exit turning a right chain wrong.
    mode: str = "event"
    scorer: Scorer | None = None
    feature_spec: FeatureSpec | None = None  # the probe's: set from the bundle
    name: str = "lynx"

    def __post_init__(self) -> None:
        if self.bundle is None:
            raise ValueError("LynxPolicy needs a probe bundle")
        pick: dict[str, Callable[[float], EventThreshold | TrajectoryThreshold]] = {
            "event": self.bundle.event_threshold,
            "trajectory": self.bundle.trajectory_threshold,
            "harm": self.bundle.harm_threshold,
        }
        if self.mode not in pick:
            raise ValueError(f"mode must be one of {sorted(pick)}, got {self.mode!r}")
        self.rule: EventThreshold | TrajectoryThreshold = pick[self.mode](self.delta)
        if self.scorer is None:
            self.scorer = ProbeScorer(self.bundle.probe)
        self.feature_spec = self.bundle.spec
        self.scores: list[float] = []

    def reset(self) -> None:
        self.scores = []

    def observe(self, step: Step) -> Decision:
        if step.cue is None or step.features is None:
            return Decision.CONTINUE
        prob = step.score if step.score is not None else float(self.bundle.probe.prob_safe(step.features[None])[0])
        self.scores.append(prob)
        if isinstance(self.rule, EventThreshold):
            exit_now = self.rule.should_exit(prob)
        else:
            exit_now = prob >= self.rule.threshold
        return Decision.EXIT if exit_now else Decision.CONTINUE


def shared_probe(context: MethodContext) -> tuple[ProbeBundle, ProbeScorer]:
    """The context's probe, loaded once, checked against the model and moved to its device."""
    if context.probe is None:
        raise ValueError("the LYNX methods need a probe (--probe DIR or a Hub repo id OWNER/NAME)")
    key = f"probe:{context.probe}"
    if key not in context.shared:
        bundle = load_probe(locate_probe(context.probe))
        if context.lm is not None:
            # Any task's probe is accepted if it lives in this model's feature space at *its own* layers.
            bundle.spec.check_compatible(context.lm.feature_spec(bundle.spec.layers), what=f"probe {context.probe!r}")
            bundle.probe.to(context.lm.device)
        context.shared[key] = (bundle, ProbeScorer(bundle.probe))
    return context.shared[key]


def _delta(text: str) -> dict[str, Any]:
    value = float(text)
    if not (math.isfinite(value) and 0 < value < 1):
        raise ValueError("δ must be in (0, 1)")
    return {"delta": value}


def _build(context: MethodContext, options: dict[str, Any]) -> LynxPolicy:
    bundle, scorer = shared_probe(context)
    mode = options.get("mode", "event")
    if mode not in MODES:
        raise ValueError(f"lynx mode must be one of {', '.join(MODES)}, got {mode!r}")
    return LynxPolicy(bundle=bundle, delta=float(options["delta"]), mode=mode, scorer=scorer)


DELTA = Knob("delta", "--delta", "--deltas", _delta, "LYNX risk level δ (confidence 1 - δ)", default="0.05",
             default_grid="0.05,0.1,0.2,0.3")
register(ExitMethod("lynx", "probe at each cue + conformal threshold (mode by --mode)", _build, knob=DELTA,
                    options=(choice_option("mode", MODES, "conformal mode"),), needs_probe=True))
for _mode in MODES:
    register(ExitMethod(f"lynx-{_mode}", f"lynx with mode {_mode}", _build, knob=DELTA, fixed=(("mode", _mode),),
                        needs_probe=True))
register(ExitMethod("speculative-thinking+lynx", "the assistant writes the reflective steps; lynx decides the exit "
                    "on the thinker's states", _build, knob=DELTA, options=(choice_option("mode", MODES, "conformal mode"),),
                    needs_probe=True, assisted=True))
