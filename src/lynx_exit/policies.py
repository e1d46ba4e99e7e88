"""Exit policies: what the decode loop asks at every thinking step (siblings behind one Protocol)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lynx_exit.decode import Step


class Decision(enum.Enum):
    CONTINUE = "continue"
    EXIT = "exit"


@runtime_checkable
class ExitPolicy(Protocol):
    """Decides, one thinking step at a time, whether to stop thinking and answer.

    `observe` sees every thinking-phase step of one sequence (cue or not); `reset` starts
    a new sequence. `needs_features` asks the loop to hook hidden states.
    """

    name: str
    needs_features: bool

    def reset(self) -> None: ...

    def observe(self, step: Step) -> Decision: ...


@dataclass
class NeverExit:
    """Full chain of thought: never exits early."""

    name: str = "never"
    needs_features: bool = False

    def reset(self) -> None:
        pass

    def observe(self, step: Step) -> Decision:
        return Decision.CONTINUE


@dataclass
class TokenBudget:
    """Force the exit cue once `budget` thinking tokens have been generated (spec §9)."""

    budget: int
    name: str = "token-budget"
    needs_features: bool = False

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"token budget must be >= 1, got {self.budget}")

    def reset(self) -> None:
        pass

    def observe(self, step: Step) -> Decision:
        return Decision.EXIT if step.index + 1 >= self.budget else Decision.CONTINUE


PolicyFactory = Callable[..., ExitPolicy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str, factory: PolicyFactory) -> None:
    _REGISTRY[name] = factory


def _load_builtin() -> None:
    # Policies that need heavier modules register themselves on import.
    import lynx_exit.baselines  # noqa: F401
    import lynx_exit.lynx  # noqa: F401


def available_policies() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_policy(name: str, **options: Any) -> ExitPolicy:
    """Build a registered policy by name; options are its constructor's keyword arguments."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown exit method {name!r}; choose from {available_policies()}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:
        raise ValueError(f"bad options {options!r} for exit method {name!r}: {exc}") from exc


def first_exit(policy: ExitPolicy, steps: Iterable[Step]) -> int | None:
    """Offline replay: index of the first step of a recorded trajectory where `policy` exits."""
    policy.reset()
    for step in steps:
        if step.phase == "think" and policy.observe(step) is Decision.EXIT:
            return step.index
    return None


register_policy("never", lambda: NeverExit())
register_policy("token-budget", lambda budget: TokenBudget(budget=int(budget)))
