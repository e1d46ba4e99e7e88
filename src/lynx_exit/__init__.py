"""lynx-exit: confidence-controlled early exit for reasoning LLMs (LYNX, arXiv 2512.05325)."""

from lynx_exit.decode import DecodeLoop, GenerationConfig, RowResult, Step, forced_answers
from lynx_exit.models import FeatureSpec, LoadedModel, load_model
from lynx_exit.policies import Decision, ExitPolicy, make_policy

__all__ = [
    "DecodeLoop",
    "Decision",
    "ExitPolicy",
    "FeatureSpec",
    "GenerationConfig",
    "LoadedModel",
    "RowResult",
    "Step",
    "forced_answers",
    "load_model",
    "make_policy",
]
__version__ = "0.1.0"
