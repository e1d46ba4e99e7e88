"""Speculative Thinking (arXiv 2504.12329) as the engine runs it: a larger model of the same family writes the
reflective steps of a small one.

The schedule follows the official code (`../shared/SPECULATIVE_THINKING.md` §1): at each paragraph break
("\\n\\n") while thinking, the thinker writes a look-ahead of `lookahead` tokens; if it holds a keyword, it
is rolled back and the assistant writes the next `takeover` tokens (`verify_extension` more when they hold a
verify word); after `recap_after` negative takeovers a recap sentence is written and the assistant writes
`recap_tokens`, both limits growing each time. Where we differ, on purpose:
- keywords match whole words and phrases (as our cue detector does), not substrings ("check" is not found in
  "checking", "yes" not in "eyes");
- a look-ahead without a keyword is kept (`keep_lookahead`, default on); the official code throws it away and
  lets the thinker write that paragraph again (`keep_lookahead=False` does the same);
- the assistant helps while the request thinks; the answer after thinking is the thinker's.

The thinker reads every token, whoever wrote it (a step of its own decode), so its cache is always whole and
its hidden states exist at every token: LYNX scores cues inside the assistant's text on the thinker's states.
The assistant reads what it has not seen in one pass when it takes over (the `extend` verb).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

VERIFY_WORDS = ("verify", "think again", "recap", "check")
NEGATIVE_WORDS = ("wait", "alternatively", "hold on", "another")
POSITIVE_WORDS = ("yeah", "yes", "final answer", "confident")
RECAP_TEXT = "Let me check whether there are some wrong steps:"


@functools.lru_cache(maxsize=64)
def _words(words: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def contains_any(text: str, words: tuple[str, ...]) -> bool:
    """Whether `text` holds one of `words` as a whole word or phrase (any case)."""
    return _words(words).search(text) is not None


def ends_paragraph(text: str, last: str, trigger: str) -> bool:
    """Whether the piece `last` that ends `text` completes `trigger` (it may start in the piece before)."""
    return trigger in text[-(len(last) + len(trigger) - 1) :]


@dataclass(frozen=True)
class AssistConfig:
    """The knobs of Speculative Thinking, with the official configuration's values."""

    lookahead: int = 20  # the thinker's look-ahead after a paragraph break (official max_target_tokens)
    takeover: int = 20  # tokens the assistant writes per takeover
    verify_extension: int = 125  # more tokens when its text holds a verify word (original_recap_token_num)
    verify_words: tuple[str, ...] = VERIFY_WORDS
    negative_words: tuple[str, ...] = NEGATIVE_WORDS
    positive_words: tuple[str, ...] = POSITIVE_WORDS
    recap_text: str = RECAP_TEXT  # "too much reflection": written after `recap_after` negative takeovers
    recap_after: int = 15
    recap_after_growth: int = 5
    recap_after_max: int = 30
    recap_tokens: int = 125
    recap_tokens_growth: int = 25
    recap_tokens_max: int = 200
    keep_lookahead: bool = True
    trigger: str = "\n\n"
    # Ours: the assistant writes on to the end of its paragraph (the next trigger), `takeover` tokens at
    # least and `takeover + verify_extension` at most, instead of handing a half-written sentence back.
    to_break: bool = False

    def __post_init__(self) -> None:
        for name in ("lookahead", "takeover", "recap_after", "recap_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"assist {name} must be a whole number >= 1, got {value!r}")
        for name in ("verify_extension", "recap_after_growth", "recap_tokens_growth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"assist {name} must be a whole number >= 0, got {value!r}")
        if self.recap_after_max < self.recap_after or self.recap_tokens_max < self.recap_tokens:
            raise ValueError(
                "assist recap_after_max / recap_tokens_max must be at least their starting values"
            )
        for name in ("verify_words", "negative_words", "positive_words"):
            words = getattr(self, name)
            if not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"assist {name} must be a non-empty list of words, got {words!r}")
        if not self.trigger:
            raise ValueError("assist trigger must be non-empty text")

    @property
    def keywords(self) -> re.Pattern[str]:
        return _words(self.verify_words + self.negative_words + self.positive_words)

    def sentiment(self, text: str) -> int:
        """+1 when positive words outnumber negative and verify ones, -1 when they do not (a tie of non-zero
        counts included, as the official code scores it), 0 when there is none."""
        positive = len(_words(self.positive_words).findall(text))
        negative = len(_words(self.negative_words + self.verify_words).findall(text))
        if positive == negative == 0:
            return 0
        return 1 if positive > negative else -1


@dataclass
class Buffered:
    """A look-ahead token read by the thinker but not yet committed to the request."""

    token_id: int
    index: int
    confidence: float | None
    features: torch.Tensor | None = None


@dataclass
class AssistState:
    """One request's place in the schedule, and what each model did for it."""

    config: AssistConfig
    driver: Literal["thinker", "assistant"] = "thinker"
    left: int = 0  # tokens the assistant still writes in this takeover
    extended: bool = False  # this takeover got its verify extension
    takeover_ids: list[int] = field(default_factory=list)  # what the assistant wrote in this takeover
    synced: int = 0  # tokens of the request (prompt first) the assistant's cache holds
    lookahead: list[Buffered] | None = None  # a look-ahead being written
    resume: Literal["thinker", "assistant"] | None = (
        None  # who samples next from what it holds (nothing is fed)
    )
    negatives: int = 0
    recap_after: int = 0
    recap_tokens: int = 0
    # accounting
    spans: list[list[int]] = field(default_factory=list)  # [start, end) generated indices the assistant wrote
    assistant_tokens: int = 0
    assistant_read: int = 0  # tokens the assistant read when it took over (catch-up passes)
    takeovers: int = 0
    verify_extensions: int = 0
    recaps: int = 0
    lookaheads: int = 0
    lookahead_tokens_discarded: int = 0

    def __post_init__(self) -> None:
        self.recap_after = self.recap_after or self.config.recap_after
        self.recap_tokens = self.recap_tokens or self.config.recap_tokens

    def report(self, generated: int) -> dict[str, Any]:
        return {
            "thinker_tokens": generated - self.assistant_tokens,
            "assistant_tokens": self.assistant_tokens,
            "assistant_share": round(self.assistant_tokens / generated, 4) if generated else 0.0,
            "assistant_read_tokens": self.assistant_read,
            "takeovers": self.takeovers,
            "verify_extensions": self.verify_extensions,
            "recaps": self.recaps,
            "lookaheads": self.lookaheads,
            "lookahead_tokens_discarded": self.lookahead_tokens_discarded,
            "assistant_spans": [span for span in self.spans if span[0] < generated],
        }

    def wrote(self, index: int) -> None:
        """The assistant wrote generated token `index`."""
        if self.spans and self.spans[-1][1] == index:
            self.spans[-1][1] = index + 1
        else:
            self.spans.append([index, index + 1])
