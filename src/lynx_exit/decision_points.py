"""Decision points: the tokens at which an exit policy may decide, by kind.

`cue` is the paper's (a cue word or the cue regex, `lynx_exit.cues`). `answer` is where a stated answer closes
inside the thinking (a balanced `\\boxed{…}` or the family's answer phrase, "the answer is 42"): where
first-answer, DEER and TERMINATOR decide. `paragraph` is where a step ends (a blank line, or the family's step
separator). A request enables some kinds; the detector says which one each token completes, one per token (the
first of `PRIORITY`). Only generated text inside the thinking block is read, and an answer phrase inside an
open quotation (the model restating the problem) is not an answer."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from lynx_exit.cues import DEFAULT_CUE_WORDS, CueDetector, compile_cue_pattern
from lynx_exit.tasks.grading import BOXED_MARKERS, boxed_spans

POINT_KINDS: dict[str, str] = {
    "cue": "a cue word (wait, hmm, alternatively) or the cue regex completes: the paper's decision points",
    "answer": "a stated answer closes inside the thinking: a balanced \\boxed{...} or the family's answer "
    "phrase",
    "paragraph": "a reasoning step ends: a blank line, or the family's step separator",
}
PRIORITY = ("answer", "cue", "paragraph")  # one token completing several points is the first of these
DEFAULT_POINTS: tuple[str, ...] = ("cue",)

# "the answer is 42" with the number complete: followed by something that cannot continue it.
DEFAULT_ANSWER_PHRASE = r"\banswer is\s*:?\s*\$?\s*-?\d+(?:,\d{3})*(?:\.\d+)?(?=[^\d.,]|[.,][^\d])"
DEFAULT_STEP_SEPARATOR = r"\n[ \t]*\n"  # a blank line
_OPEN_QUOTES, _CLOSE_QUOTES = "“", "”"

# What an exit keeps of the thinking before it closes the block and writes the exit cue.
EXIT_PREFIXES: dict[str, str] = {
    "point": "the paper's: a cue point's prefix ends before the cue token, an answer or paragraph point's "
    "after its "
    "token",
    "lookahead": "the prefix ends after the token that confirmed the point (the one sampled after it): what "
    "an "
    "engine that cannot take back a sampled token does (the vLLM plug-in)",
}
DEFAULT_EXIT_PREFIX = "point"


def exit_prefix_value(value: Any) -> str:
    """A valid exit prefix, or ValueError naming the choices."""
    if value not in EXIT_PREFIXES:
        raise ValueError(f"unknown exit prefix {value!r}; choose from {', '.join(EXIT_PREFIXES)}")
    return str(value)


def parse_points(value: Any) -> tuple[str, ...]:
    """Point kinds from `"cue,answer"` (a flag) or `["cue", "answer"]` (JSON), in the registry's order;
    ValueError naming a kind that does not exist."""
    if isinstance(value, str):
        items: Iterable[Any] = [part.strip() for part in value.replace("+", ",").split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ValueError(f"must be a comma-separated string or a list of point kinds, got {value!r}")
    kinds = []
    for item in items:
        if not isinstance(item, str) or item not in POINT_KINDS:
            raise ValueError(f"unknown decision point kind {item!r}; choose from {', '.join(POINT_KINDS)}")
        kinds.append(item)
    if not kinds:
        raise ValueError(f"name at least one decision point kind ({', '.join(POINT_KINDS)})")
    return tuple(kind for kind in POINT_KINDS if kind in kinds)


def points_key(points: Sequence[str]) -> str:
    """One name for a set of kinds (`cue+answer`): how calibrations and eval labels refer to it."""
    return "+".join(kind for kind in POINT_KINDS if kind in points)


def compile_point_pattern(name: str, regex: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ValueError(f"invalid {name} regex {regex!r}: {exc}") from None
    if pattern.match(""):
        raise ValueError(f"the {name} regex {regex!r} matches empty text")
    return pattern


class PointDetector(CueDetector):
    """A cue detector that also finds answer and paragraph points; `point` is the kind the last `step`
    completed.

    `step` still returns the cue word (cue indices are reported whatever the enabled kinds); `point` is
    set only for an enabled kind. Like a cue word, an answer phrase is confirmed with the text of the next
    token (`42` is an answer once `.` or a space shows it is not `425`)."""

    def __init__(
        self,
        pattern: re.Pattern[str],
        kinds: Sequence[str] = DEFAULT_POINTS,
        answer_phrase: re.Pattern[str] | None = None,
        step_separator: re.Pattern[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.kinds = frozenset(parse_points(list(kinds)))
        self.answer_phrase = answer_phrase or compile_point_pattern("answer phrase", DEFAULT_ANSWER_PHRASE)
        self.step_separator = step_separator or compile_point_pattern(
            "step separator", DEFAULT_STEP_SEPARATOR
        )
        self._beyond_cues = bool(self.kinds - {"cue"})  # answer or paragraph points to look for
        self.point: str | None = None
        super().__init__(pattern, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.point = None
        self._found: set[tuple[str, int]] = set()  # (kind, absolute end) already reported
        self._quoted_at_tail = False  # inside an open quotation at the tail's first character

    def completing_chars(self) -> frozenset[str] | None:
        """As the cue detector's, for cue points alone (answers and paragraphs end on too many characters)."""
        return None if self._beyond_cues else super().completing_chars()

    def append(self, text: str) -> None:
        if self._beyond_cues:
            raise RuntimeError("append skips the scan, which answer and paragraph points need")
        super().append(text)

    def step(self, delta: str, lookahead: str = "") -> str | None:
        thinking, tail_start = self.thinking, self._tail_start
        start_of_delta = tail_start + len(self._tail)
        cue = super().step(delta, lookahead)
        self.point = None
        if not thinking:
            return cue
        if self._tail_start != tail_start:  # the base trimmed its tail: carry the quotation state over
            self._quoted_at_tail = self._quoted_after(self._quoted_at_tail, self._trimmed)
            self._found = {item for item in self._found if item[1] > self._tail_start}
        if not self._beyond_cues:  # a cue is the one point there is
            self.point = "cue" if cue is not None and "cue" in self.kinds else None
            return cue
        fired = {"cue"} if cue is not None else set()
        fired |= self._extra_points(start_of_delta, lookahead)
        self.point = next((kind for kind in PRIORITY if kind in fired and kind in self.kinds), None)
        return cue

    def _extra_points(self, start_of_delta: int, lookahead: str) -> set[str]:
        committed_end = self._tail_start + len(self._tail)
        text = self._tail + lookahead
        if self.think_end and self.think_end in text:
            text = text[: text.index(self.think_end) + 1]  # the marker's first character ends a number
        opened = self._cues_from
        if opened is None:
            return set()
        fired = set()

        def new(kind: str, abs_start: int, abs_end: int) -> bool:
            if abs_start < opened or abs_end > committed_end or (kind, abs_end) in self._found:
                return False
            self._found.add((kind, abs_end))
            return True

        if "answer" in self.kinds:
            for match in self.answer_phrase.finditer(text):
                start, end = self._tail_start + match.start(), self._tail_start + match.end()
                if new("answer", start, end) and not self._quoted(match.start()):
                    fired.add("answer")
            for start, end in (span for marker in BOXED_MARKERS for span in boxed_spans(text, marker)):
                if new("answer", self._tail_start + start, self._tail_start + end):
                    fired.add("answer")
        if "paragraph" in self.kinds:
            for match in self.step_separator.finditer(text):
                start, end = self._tail_start + match.start(), self._tail_start + match.end()
                if end > start_of_delta and new("paragraph", start, end):
                    fired.add("paragraph")
        return fired

    def _quoted(self, offset: int) -> bool:
        """Whether tail offset `offset` is inside an open quotation ("…" or “…”)."""
        return self._quoted_after(self._quoted_at_tail, self._tail[:offset])

    @staticmethod
    def _quoted_after(quoted: bool, text: str) -> bool:
        for char in text:
            if char == '"':
                quoted = not quoted
            elif char in _OPEN_QUOTES:
                quoted = True
            elif char in _CLOSE_QUOTES:
                quoted = False
        return quoted


def detector_for(
    profile: Any,
    points: Sequence[str],
    thinking: str,
    cue_words: Sequence[str] = DEFAULT_CUE_WORDS,
    cue_regex: str | None = None,
) -> PointDetector:
    """The detector of one request: a model profile's markers and point settings (`ModelProfile`), the enabled
    kinds, how thinking starts ("template", "model", "off") and the cue words or regex."""
    return PointDetector(
        compile_cue_pattern(cue_words, cue_regex),
        kinds=points,
        answer_phrase=compile_point_pattern("answer phrase", profile.answer_phrase),
        step_separator=compile_point_pattern("step separator", profile.step_separator),
        think_end=profile.think_end,
        think_start=profile.think_start,
        start=thinking,
        max_cue_chars=None if cue_regex else max(len(w.strip()) for w in cue_words),
        cue_words=None if cue_regex else cue_words,
    )
