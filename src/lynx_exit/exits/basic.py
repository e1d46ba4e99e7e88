"""Full chain of thought and the token budget (how-it-works §9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lynx_exit.engine.types import Decision, Step
from lynx_exit.exits.registry import BasePolicy, ExitMethod, Knob, MethodContext, positive_int, register


@dataclass
class NeverExit(BasePolicy):
    """Full chain of thought: never exits early."""

    name: str = "never"


@dataclass
class TokenBudget(BasePolicy):
    """Force the exit cue once `budget` thinking tokens have been generated."""

    budget: int
    name: str = "token-budget"

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"token budget must be >= 1, got {self.budget}")

    def observe(self, step: Step) -> Decision:
        return Decision.EXIT if step.index + 1 >= self.budget else Decision.CONTINUE


def _budget(_context: MethodContext, options: dict[str, Any]) -> TokenBudget:
    return TokenBudget(budget=int(options["budget"]))


register(ExitMethod("never", "full chain of thought", lambda _c, _o: NeverExit()))
register(
    ExitMethod(
        "speculative-thinking",
        "full chain of thought; a larger model of the same family writes the "
        "reflective steps (arXiv 2504.12329)",
        lambda _c, _o: NeverExit(),
        assisted=True,
    )
)
register(
    ExitMethod(
        "token-budget",
        "exit after N thinking tokens",
        _budget,
        knob=Knob(
            "budget",
            "--budget",
            "--budgets",
            lambda t: {"budget": positive_int(t)},
            "thinking-token budget N",
            default_grid="128,256,512",
        ),
    )
)
