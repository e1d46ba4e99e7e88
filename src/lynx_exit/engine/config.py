"""Per-request generation settings; each field is one CLI flag and one server request field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lynx_exit.cues import DEFAULT_CUE_WORDS, compile_cue_pattern


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and exit settings of one request."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0  # end-of-sequence is suppressed until this many tokens exist
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 means no top-k filter
    seed: int = 0
    exit_cue: str = "boxed"  # a variant (`boxed`, `answer_tag`) in the model family's format, or literal text
    answer_max_tokens: int = 64
    cue_words: tuple[str, ...] = DEFAULT_CUE_WORDS
    cue_regex: str | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.answer_max_tokens < 1:
            raise ValueError(f"answer_max_tokens must be >= 1, got {self.answer_max_tokens}")
        if not self.exit_cue.strip():
            raise ValueError(f"exit_cue must be a variant name or non-empty text, got {self.exit_cue!r}")
        compile_cue_pattern(self.cue_words, self.cue_regex)  # validates
