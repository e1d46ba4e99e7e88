"""The reference reasoning models: synthetic word problems (`problems`), the traces they learn (`traces`) and
their training (`training`)."""

from lynx_exit.reference.problems import (
    NAMES,
    OBJECTS,
    SPLIT_SEEDS,
    SPLITS,
    WordProblem,
    apply_op,
    as_task_problems,
    describe_op,
    make_problems,
    sample_problem,
)
from lynx_exit.reference.traces import LARGE, PRESETS, SMALL, Trace, TracePreset, generate_trace, make_trace
from lynx_exit.reference.training import ReferenceTrainConfig, build_corpus, train_reference_model

__all__ = [
    "LARGE",
    "NAMES",
    "OBJECTS",
    "PRESETS",
    "SMALL",
    "SPLITS",
    "SPLIT_SEEDS",
    "ReferenceTrainConfig",
    "Trace",
    "TracePreset",
    "WordProblem",
    "apply_op",
    "as_task_problems",
    "build_corpus",
    "describe_op",
    "generate_trace",
    "make_problems",
    "make_trace",
    "sample_problem",
    "train_reference_model",
]
