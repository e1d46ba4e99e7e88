"""Exit methods behind one protocol, each registered once (importing this package registers them)."""

from lynx_exit.engine.types import Decision, ExitPolicy
from lynx_exit.exits import baselines, basic, deepconf, lynx
from lynx_exit.exits.baselines import (
    AnswerConvergencePolicy,
    DeerPolicy,
    DynasorPolicy,
    EatPolicy,
    FirstAnswerPolicy,
    NoWaitPolicy,
    cue_token_ids,
)
from lynx_exit.exits.basic import NeverExit, TokenBudget
from lynx_exit.exits.deepconf import DeepConfPolicy
from lynx_exit.exits.lynx import LynxPolicy
from lynx_exit.exits.registry import (
    METHODS,
    BasePolicy,
    ExitMethod,
    ExitSettingError,
    Knob,
    MethodContext,
    MethodSetting,
    Option,
    first_exit,
    get_method,
    knobs,
    make_policy,
    method_names,
    parse_methods,
    resolve_exit_options,
)

__all__ = [
    "METHODS",
    "AnswerConvergencePolicy",
    "DeepConfPolicy",
    "EatPolicy",
    "FirstAnswerPolicy",
    "deepconf",
    "BasePolicy",
    "Decision",
    "DeerPolicy",
    "DynasorPolicy",
    "ExitMethod",
    "ExitSettingError",
    "resolve_exit_options",
    "ExitPolicy",
    "Knob",
    "LynxPolicy",
    "MethodContext",
    "MethodSetting",
    "NeverExit",
    "NoWaitPolicy",
    "Option",
    "TokenBudget",
    "baselines",
    "basic",
    "cue_token_ids",
    "first_exit",
    "get_method",
    "knobs",
    "lynx",
    "make_policy",
    "method_names",
    "parse_methods",
]
