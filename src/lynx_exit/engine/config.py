"""Per-request generation settings; each field is one CLI flag and one server request field."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lynx_exit.cues import DEFAULT_CUE_WORDS, compile_cue_pattern

# A temperature below this samples as greedy: logits / T overflow long before T reaches 0 (vLLM uses the
# same 1e-5).
GREEDY_BELOW = 1e-5
MAX_TOKENS = 2**31 - 1  # largest token count any field takes
SEED_RANGE = (-(2**63), 2**64)  # what `torch.Generator.manual_seed` accepts


def _whole(name: str, value: object, low: int, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and exit settings of one request; every field is checked here, so no request's values can
    break the batched step it shares with others."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0  # end-of-sequence is suppressed until this many tokens exist
    temperature: float = 0.6  # 0 (or anything below GREEDY_BELOW) means greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 means no top-k filter; a value at or above the vocabulary means none either
    seed: int = 0
    exit_cue: str = "boxed"  # a variant (`boxed`, `answer_tag`) in the model family's format, or literal text
    answer_max_tokens: int = 64
    cue_words: tuple[str, ...] = DEFAULT_CUE_WORDS
    cue_regex: str | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        _whole("max_new_tokens", self.max_new_tokens, 1, MAX_TOKENS)
        _whole("min_new_tokens", self.min_new_tokens, 0, MAX_TOKENS)
        _whole("top_k", self.top_k, 0, math.inf)  # the engine turns a top-k at or above the vocabulary off
        _whole("seed", self.seed, SEED_RANGE[0], SEED_RANGE[1] - 1)
        _whole("answer_max_tokens", self.answer_max_tokens, 1, MAX_TOKENS)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.exit_cue, str) or not self.exit_cue.strip():
            raise ValueError(f"exit_cue must be a variant name or non-empty text, got {self.exit_cue!r}")
        compile_cue_pattern(self.cue_words, self.cue_regex)  # validates

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine (shared by every request it runs); each field is one CLI flag of `generate` and
    `serve`. `prefill_tokens_per_step`: prompt tokens read per step over all joining requests (a longer
    prompt is read in chunks while the running requests keep decoding: vLLM's chunked prefill)."""

    max_batch_size: int = 16
    kv_cache_gb: float | None = None  # the KV cache's memory budget (None: as much as the requests need)
    prefill_tokens_per_step: int = 2048
    # each decode step as one compiled graph (CUDA graphs on a GPU); "auto": on CUDA, not on a CPU (where the
    # eager step is as fast for most models and a compile costs seconds)
    compile: bool | str = "auto"
    # the next decode launched before the host reads this step's tokens (`overlap`); None: where the device
    # runs apart from the host (CUDA), not on a CPU (where it changes nothing but the order of the work)
    overlap: bool | None = None

    def __post_init__(self) -> None:
        _whole("max_batch_size", self.max_batch_size, 1, MAX_TOKENS)
        _whole("prefill_tokens_per_step", self.prefill_tokens_per_step, 1, MAX_TOKENS)
        if self.kv_cache_gb is not None and (
            isinstance(self.kv_cache_gb, bool)
            or not isinstance(self.kv_cache_gb, int | float)
            or not math.isfinite(self.kv_cache_gb)
            or self.kv_cache_gb <= 0
        ):
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb!r}")
        if not isinstance(self.compile, bool) and self.compile != "auto":
            raise ValueError(f"compile must be true, false or 'auto', got {self.compile!r}")
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be true, false or None, got {self.overlap!r}")


def compiles_on(setting: bool | str, device: torch.device) -> bool:
    """Whether a `compile` setting compiles on this device ("auto": on CUDA only)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)
