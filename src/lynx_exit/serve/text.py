"""One choice's text as an OpenAI client sees it: thinking vs answer, stop strings, stream deltas.

The engine reports every token with its phase. Chat responses put the thinking in
`reasoning_content` and the text after the end of thinking (natural, or the exit cue and the
forced answer) in `content`, without the thinking-end marker, as vLLM's and DeepSeek's
reasoning APIs do. Raw completions (`split=False`) keep the model's text as it is.

Stop strings end the choice at their first occurrence in either channel (the match is not
returned). Streaming holds back the few characters that could still turn out to be the start of
a stop string or of the marker, so nothing is sent that would have to be taken back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lynx_exit.engine.types import Phase

Channel = str  # "reasoning" or "content"


@dataclass
class ChoiceText:
    think_end: str | None  # the model's thinking-end marker (None: markerless model)
    stop: tuple[str, ...] = ()
    split: bool = True  # False: everything is `content`, marker included (raw completions)
    reasoning: str = ""
    content: str = ""
    stopped: bool = False  # a stop string matched; the choice is over
    _closed: bool = False  # the thinking channel is closed (the answer has begun)
    _lead: str = ""  # answer text held until its start is known not to be the marker or blank
    _sent: dict[str, int] = field(default_factory=lambda: {"reasoning": 0, "content": 0})

    def __post_init__(self) -> None:
        if not self.split:
            self._closed = True
        self._hold = max([len(s) - 1 for s in self.stop] + [len(self.think_end or "") - 1 if self.split else 0, 0])

    def push(self, text: str, phase: Phase) -> None:
        """Add the text of one step (a dropped cue token's text must not be pushed)."""
        if self.stopped or not text:
            return
        if phase == "think" and not self._closed:
            start = max(0, len(self.reasoning) - len(self.think_end or ""))
            self.reasoning += text
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

    def _add_content(self, text: str) -> None:
        if self.stopped:
            return
        if not self.split:
            self.content += text
            self._check_stop("content")
            return
        if not self.content:  # the answer's start: drop the marker an exit cue writes, and blank lines
            self._lead += text
            lead = self._lead.lstrip()
            marker = self.think_end or ""
            if not lead or (marker and marker.startswith(lead)):
                return
            text = lead.removeprefix(marker).lstrip() if marker else lead
            self._lead = "" if text else self._lead
            if not text:
                return
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
        if final and self._lead and not self.stopped:  # an answer that never got past blanks or a marker prefix
            lead, self._lead = self._lead.strip(), ""
            if lead and lead != self.think_end:
                self.content += lead
        out = []
        for channel in ("reasoning", "content"):
            text = getattr(self, channel)
            open_channel = channel == "content" or not self._closed
            end = len(text) if final or self.stopped or not open_channel else max(self._sent[channel], len(text) - self._hold)
            out.append(text[self._sent[channel] : end])
            self._sent[channel] = end
        return out[0], out[1]
