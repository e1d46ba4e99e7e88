"""Cue detection while streaming: which generated token completes a cue word (how-it-works §1)."""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

DEFAULT_CUE_WORDS: tuple[str, ...] = ("hmm", "wait", "alternatively")

# Characters kept behind the current token; long enough for any cue word plus its boundary, and for a stated
# answer (a decision point of kind "answer", `lynx_exit.decision_points`).
_TAIL_CHARS = 256


class Detokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def compile_cue_pattern(
    words: Sequence[str] = DEFAULT_CUE_WORDS, regex: str | None = None
) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern for `words`, or the user's `regex` as given.

    A word match needs a following non-word character, so `wait` is only confirmed once
    the next character shows it is not `waiting`.
    """
    if regex is not None:
        if not regex:
            raise ValueError("cue regex must not be empty")
        try:
            return re.compile(regex)
        except re.error as exc:
            raise ValueError(f"invalid cue regex {regex!r}: {exc}") from exc
    cleaned = [w.strip() for w in words]
    if not cleaned or any(not w for w in cleaned):
        raise ValueError(f"cue words must be non-empty strings, got {list(words)!r}")
    alternatives = "|".join(re.escape(w) for w in sorted(cleaned, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?=\W)", re.IGNORECASE)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, safe for byte-level pieces.

    Follows the prefix/read-offset scheme used by vLLM: a token whose bytes do not yet form
    a complete character yields an empty delta, and its text arrives with the next token.
    """

    def __init__(self, tokenizer: Detokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # The Rust tokenizer behind a fast transformers tokenizer decodes identically when no
        # space clean-up is configured, at a fraction of the wrapper's per-call cost (hot path).
        backend = getattr(tokenizer, "_tokenizer", None)
        self._whole: dict[int, str | None] | None = None  # see `_whole_text`
        if (
            backend is not None
            and hasattr(backend, "decode")
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        ):
            self._decode: Callable[[list[int]], str] = lambda ids: backend.decode(
                ids, skip_special_tokens=skip_special_tokens
            )
            self._whole = _whole_texts(tokenizer, backend)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._peeked: tuple[tuple[int, int], str] | None = None  # the last peek, reused by the next push
        self._prefix_text: tuple[tuple[int, int], str] | None = None  # text of ids[prefix:read], per offsets

    def push(self, token_id: int) -> str:
        """Commit `token_id` and return the text it adds."""
        delta = self.peek(token_id)
        self.token_ids.append(token_id)
        self._peeked = None
        if delta:
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return delta

    def push_many(self, token_ids: list[int]) -> str:
        """Commit several tokens at once and return the text they add: one decode for all (what their pushes
        one by one would add in all; the tokens' share of it may differ, which nobody reads)."""
        if not token_ids:
            return ""
        self.token_ids.extend(token_ids)
        self._peeked = None
        offsets = (self._prefix_offset, self._read_offset)
        if self._prefix_text is None or self._prefix_text[0] != offsets:
            self._prefix_text = (
                offsets,
                self._decode(self.token_ids[self._prefix_offset : self._read_offset]),
            )
        prefix_text = self._prefix_text[1]
        full_text = self._decode(self.token_ids[self._prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        self._prefix_offset, self._read_offset = (
            self._read_offset,
            len(self.token_ids),
        )  # as a push that adds text
        return full_text[len(prefix_text) :]

    def peek(self, token_id: int) -> str:
        """The delta `push(token_id)` would return, without committing it (cached for that push)."""
        key = (token_id, len(self.token_ids))
        if self._peeked is not None and self._peeked[0] == key:
            return self._peeked[1]
        if self._whole is not None and self._read_offset == key[1]:  # every token read so far is text
            whole = self._whole.get(token_id, "")  # "": not seen yet (an empty text is kept as None)
            if whole == "":
                whole = self._whole[token_id] = self._whole_text(token_id)
            if whole is not None:
                self._peeked = (key, whole)
                return whole
        ids = self.token_ids[self._prefix_offset :] + [token_id]
        offsets = (self._prefix_offset, self._read_offset)
        if self._prefix_text is None or self._prefix_text[0] != offsets:  # changes only when text was emitted
            self._prefix_text = (offsets, self._decode(ids[: self._read_offset - self._prefix_offset]))
        prefix_text = self._prefix_text[1]
        full_text = self._decode(ids)
        delta = (
            ""
            if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text)
            else full_text[len(prefix_text) :]
        )
        self._peeked = (key, delta)
        return delta

    def _whole_text(self, token_id: int) -> str | None:
        """The text of a token that is whole characters (None: not, or not known to be). Byte-level BPE text
        is its tokens' bytes read as UTF-8: once the tokens before it ended on a whole character, such a token
        adds exactly its own text, so a peek needs no decode."""
        text = self._decode([token_id])
        return text if text and "\ufffd" not in text else None


_WHOLE_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, str | None]] = weakref.WeakKeyDictionary()


def _whole_texts(tokenizer: Any, backend: Any) -> dict[int, str | None] | None:
    """The texts of a byte-level tokenizer's ordinary tokens, shared by every detokenizer of it (filled as the
    tokens come); None for any other tokenizer (a decoder that strips or joins, added tokens aside, is not a
    concatenation of its tokens' texts)."""
    decoder = getattr(backend, "decoder", None)
    if type(decoder).__name__ != "ByteLevel" or type(decoder).__module__.split(".")[0] != "tokenizers":
        return None
    try:
        texts = _WHOLE_TEXTS.get(backend)
        if texts is None:
            texts = _WHOLE_TEXTS[backend] = {}
    except TypeError:  # not weakly referable: a table of its own
        texts = {}
    for token_id in getattr(tokenizer, "added_tokens_decoder", {}):
        texts[int(token_id)] = None  # an added token's text is its content, not bytes: always decoded
    return texts


class CueDetector:
    """Streaming cue detector for one sequence (how-it-works §1, whole-word and incremental).

    `step(delta, lookahead)` commits the text of the token just fed to the model and
    returns the cue word that token completes, if any. `lookahead` is the text of the
    token sampled next: a word cue is only confirmed once the following character shows
    it is a whole word (`wait,` yes, `waiting` no). Nothing after `think_end` is a cue.

    `start` says how thinking starts: "template" (the prompt opened it: cues from the first
    token), "model" (cues only after the model writes `think_start`) or "off" (the prompt
    closed it: no thinking, no cues).
    """

    def __init__(
        self,
        pattern: re.Pattern[str],
        think_end: str | None = "</think>",
        max_cue_chars: int | None = None,
        think_start: str | None = None,
        start: str = "template",
        cue_words: Sequence[str] | None = None,
    ) -> None:
        """`max_cue_chars` (the longest cue word) lets each step scan only the last few characters;
        `cue_words` (the words `pattern` was compiled from, if it was) lets a caller skip `step` for text that
        completes none."""
        if start == "model" and not think_start:
            raise ValueError("start='model' needs the think_start marker the model writes")
        self.cue_words = tuple(w.strip() for w in cue_words) if cue_words is not None else None
        self.pattern = pattern
        self.think_end = think_end
        self.think_start = think_start
        self.start = start
        self.max_cue_chars = max_cue_chars
        self._completing = self.completing_chars()
        self.reset()

    def reset(self) -> None:
        self._tail = ""
        self._trimmed = ""  # what the last trim dropped from the front of `_tail`
        self._tail_start = 0  # absolute char offset of _tail[0]
        self._reported_ends: set[int] = set()
        self.thinking = self.start != "off"
        # Absolute offset where cues may start: 0 once thinking is open, None while waiting for think_start.
        self._cues_from: int | None = 0 if self.start == "template" else None
        self._scanned_ahead: str | None = None  # the look-ahead text the last step scanned (None: not whole)

    def step(self, delta: str, lookahead: str = "") -> str | None:
        seen, self._scanned_ahead = self._scanned_ahead, lookahead or None
        self._tail += delta
        if not self.thinking:
            return None
        completing = self._completing
        if delta == seen and completing is not None and delta.isascii() and completing.isdisjoint(delta):
            # The last step scanned this very text as its look-ahead, so every word that ended before it was
            # confirmed or refused then; text without a completing character ends no cue and no marker.
            self._trim()
            return None
        committed_end = self._tail_start + len(self._tail)
        if self._cues_from is None:
            assert self.think_start is not None
            recent = self._tail[-(len(delta) + len(self.think_start)) :]
            if self.think_start in recent:
                self._cues_from = (
                    committed_end - len(recent) + recent.index(self.think_start) + len(self.think_start)
                )
        window = 0  # a word match ending in this delta starts at most max_cue_chars (+1 boundary) back
        if self.max_cue_chars is not None:
            window = max(0, len(self._tail) - len(delta) - self.max_cue_chars - 1)
        scan_start = self._tail_start + window
        scan_text = self._tail[window:] + lookahead
        marker_at = scan_text.find(self.think_end) if self.think_end else -1
        if marker_at >= 0:
            scan_text = scan_text[: marker_at + 1]  # keep the marker's first char as a word boundary
        found = None
        for match in self.pattern.finditer(scan_text):
            if match.start() == 0 and scan_start > 0:
                continue  # the char before it is outside the scan: cannot confirm a word start
            abs_end = scan_start + match.end()
            if self._cues_from is None or scan_start + match.start() < self._cues_from:
                continue  # before the thinking block opened
            if (
                match.end() > match.start()
                and abs_end <= committed_end
                and abs_end not in self._reported_ends
            ):
                self._reported_ends.add(abs_end)
                found = match.group(0).strip().lower() or match.group(0)
        if (
            self.think_end
            and marker_at >= 0
            and self.think_end in self._tail[-(len(delta) + len(self.think_end)) :]
        ):
            self.thinking = False
        self._trim()
        return found

    def completing_chars(self) -> frozenset[str] | None:
        """Characters one of which any text that completes a cue word or a thinking marker holds (the last
        character of each, in either case); None when that cannot be told (a cue regex)."""
        if self.cue_words is None:
            return None
        chars = {c for word in self.cue_words for c in (word[-1].lower(), word[-1].upper())}
        return frozenset(chars | {marker[-1] for marker in (self.think_start, self.think_end) if marker})

    def append(self, text: str) -> None:
        """Commit text that holds none of `completing_chars` (so completes no cue and no marker): the state
        `step` would leave, without scanning. The text of a cue word it ends the next `step` still confirms
        with its look-ahead."""
        self._tail += text
        self._scanned_ahead = None
        self._trim()

    def _trim(self) -> None:
        if len(self._tail) > 2 * _TAIL_CHARS:  # trim in amortised chunks, not every step
            overflow = len(self._tail) - _TAIL_CHARS
            self._trimmed = self._tail[:overflow]
            self._tail = self._tail[overflow:]
            self._tail_start += overflow
            self._reported_ends = {end for end in self._reported_ends if end > self._tail_start}
