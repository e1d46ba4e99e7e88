"""Moved to `lynx_exit.tasks.grading`; this name stays for existing imports."""

from lynx_exit.tasks.grading import (
    answers_match,
    choice_letter,
    extract_boxed,
    grade,
    gsm8k_gold,
    symbolic_equal,
)

__all__ = ["answers_match", "choice_letter", "extract_boxed", "grade", "gsm8k_gold", "symbolic_equal"]
