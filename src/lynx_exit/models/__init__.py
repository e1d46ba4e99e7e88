"""Models: loading any causal LM with its profile (`loading`), the table of reasoning families (`families`),
and the hidden-state taps the probe reads (`taps`)."""

from lynx_exit.models.families import EXIT_CUE_PHRASES
from lynx_exit.models.loading import (
    REFERENCE_MODELS,
    FeatureSpec,
    LoadedModel,
    ModelSource,
    check_text,
    default_layers,
    load_model,
    smollm2_gguf_path,
    tokenizer_fingerprint,
    tokenizer_hash,
)
from lynx_exit.models.profile import (
    ModelProfile,
    ProfileOverrides,
    ThinkingStart,
    generation_prompt,
    resolve_profile,
    thinking_start,
)
from lynx_exit.models.taps import HiddenStateCapture, LayerSelection, tap_forward, tappable_layers

__all__ = [
    "EXIT_CUE_PHRASES",
    "REFERENCE_MODELS",
    "FeatureSpec",
    "HiddenStateCapture",
    "LayerSelection",
    "LoadedModel",
    "ModelProfile",
    "ModelSource",
    "ProfileOverrides",
    "ThinkingStart",
    "check_text",
    "default_layers",
    "generation_prompt",
    "load_model",
    "resolve_profile",
    "smollm2_gguf_path",
    "tap_forward",
    "tappable_layers",
    "thinking_start",
    "tokenizer_fingerprint",
    "tokenizer_hash",
]
