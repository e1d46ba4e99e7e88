"""lynx-exit: confidence-controlled early exit for reasoning LLMs (LYNX, arXiv 2512.05325)."""

from lynx_exit.engine import DecodeLoop, Engine, GenerationConfig, RequestResult, Step
from lynx_exit.engine.types import Decision, ExitPolicy
from lynx_exit.exits import make_policy, method_names
from lynx_exit.models import FeatureSpec, LoadedModel, load_model

__all__ = [
    "DecodeLoop",
    "Decision",
    "Engine",
    "ExitPolicy",
    "FeatureSpec",
    "GenerationConfig",
    "LoadedModel",
    "RequestResult",
    "Step",
    "load_model",
    "make_policy",
    "method_names",
]
__version__ = "0.1.0"
