"""One choice's text as an OpenAI client sees it: thinking vs answer, stop strings, stream deltas.

The engine reports every token with its phase. Chat responses put the thinking in
`reasoning_content` and the text after the end of thinking (natural, or the exit cue and the
forced answer) in `content`, without the family's markers, as vLLM's and DeepSeek's reasoning
APIs do: the thinking-start marker a model writes itself (Qwen3's `<think>`, Magistral's
`[THINK]`, gpt-oss's analysis-channel header) leaves the reasoning, and the thinking-end marker
and the header that opens the answer (gpt-oss's final-channel header) leave the content. Raw
completions (`split=False`) keep the model's text as it is.

Stop strings end the choice at their first occurrence in either channel (the match is not
returned). Streaming holds back the few characters that could still turn out to be the start of
a stop string or of the marker, so nothing is sent that would have to be taken back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lynx_exit.engine.types import Phase
from lynx_exit.models.profile import ModelProfile, ThinkingStart

Channel = str  # "reasoning" or "content"


@dataclass
class ChoiceText:
    think_end: str | None  # the model's thinking-end marker (None: markerless model)
    stop: tuple[str, ...] = ()
    split: bool = True  # False: everything is `content`, marker included (raw completions)
    think_start: str | None = None  # the thinking-start marker, where the model writes it (not the template)
    answer_header: str = ""  # what opens the answer after the thinking-end marker (gpt-oss's final channel)
    reasoning: str = ""
    content: str = ""
    stopped: bool = False  # a stop string matched; the choice is over
    _closed: bool = False  # the thinking channel is closed (the answer has begun)
    _opened: bool = False  # the thinking-start marker has been seen (and dropped)
    _lead: str = ""  # answer text held until its start is known not to be the marker or blank
    _sent: dict[str, int] = field(default_factory=lambda: {"reasoning": 0, "content": 0})

    @classmethod
    def for_profile(
        cls,
        profile: ModelProfile,
        stop: tuple[str, ...] = (),
        split: bool = True,
        thinking: ThinkingStart | None = None,
    ) -> ChoiceText:
        """The text of one choice of a model with this profile (`thinking`: how its prompt starts thinking,
        if not as the profile says)."""
        opening = (
            profile.think_start if (thinking or profile.thinking) == "model" else None
        )  # a template's is in the prompt
        return cls(
            profile.think_end, stop, split=split, think_start=opening, answer_header=profile.answer_header
        )

    def __post_init__(self) -> None:
        if not self.split:
            self._closed = True
        markers = [self.think_end or "", self.think_start or ""] if self.split else []
        self._hold = max([len(s) - 1 for s in self.stop] + [len(m) - 1 for m in markers] + [0])
        self._lead_markers = [m for m in (self.think_end, self.answer_header) if m]

    def push(self, text: str, phase: Phase) -> None:
        """Add the text of one step (a dropped cue token's text must not be pushed)."""
        if self.stopped or not text:
            return
        if phase == "think" and not self._closed:
            start = max(0, len(self.reasoning) - len(self.think_end or ""))
            self.reasoning += text
            start = max(0, start - self._drop_think_start())
            if self.think_end and self.think_end in self.reasoning[start:]:
                at = self.reasoning.index(self.think_end, start)
                rest = self.reasoning[at + len(self.think_end) :]
                self.reasoning = self.reasoning[:at]
                self._closed = True
                self._check_stop("reasoning")
                self._add_content(rest)
                return
            self._check_stop("reasoning")
            return
        if not self._closed and self.think_end and self.think_end in text:
            # An exit cue's first piece can carry the thinking's last incomplete character before the marker.
            head, text = text.split(self.think_end, 1)
            self.reasoning += head
            self._check_stop("reasoning")
        self._closed = True
        self._add_content(text)

    def _drop_think_start(self) -> int:
        """Remove the first thinking-start marker the model writes (held back until it is known); its
        length."""
        if self._opened or not self.think_start:
            return 0
        at = self.reasoning.find(self.think_start, self._sent["reasoning"])
        if at < 0:
            return 0
        self.reasoning = self.reasoning[:at] + self.reasoning[at + len(self.think_start) :]
        self._opened = True
        return len(self.think_start)

    def _answer_start(self, lead: str) -> str | None:
        """`lead` without the markers that open the answer and blanks; None while it may still be one."""
        lead = lead.lstrip()
        for marker in self._lead_markers:
            if marker.startswith(lead):
                return None
            lead = lead.removeprefix(marker).lstrip()
        return lead or None

    def _add_content(self, text: str) -> None:
        if self.stopped:
            return
        if not self.split:
            self.content += text
            self._check_stop("content")
            return
        if (
            not self.content
        ):  # the answer's start: drop the markers an exit cue or the model writes, and blanks
            self._lead += text
            start = self._answer_start(self._lead)
            if start is None:
                return
            text, self._lead = start, ""
        self.content += text
        self._check_stop("content")

    def _check_stop(self, channel: Channel) -> None:
        if not self.stop:
            return
        text = getattr(self, channel)
        start = max(0, self._sent[channel] - self._hold)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            setattr(self, channel, text[: min(hits)])
            self.stopped = True

    def take(self, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) text not sent yet that can no longer change; everything if `final`."""
        if (
            final and self._lead and not self.stopped
        ):  # an answer that never got past blanks or a marker prefix
            lead, self._lead = self._lead.lstrip(), ""
            for marker in self._lead_markers:
                lead = lead.removeprefix(marker).lstrip()
            self.content += lead.rstrip()
        out = []
        for channel in ("reasoning", "content"):
            text = getattr(self, channel)
            open_channel = channel == "content" or not self._closed
            end = (
                len(text)
                if final or self.stopped or not open_channel
                else max(self._sent[channel], len(text) - self._hold)
            )
            out.append(text[self._sent[channel] : end])
            self._sent[channel] = end
        return out[0], out[1]
