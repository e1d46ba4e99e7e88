"""LYNX for one request of an engine that cannot take back a sampled token (vLLM): the host-side state machine
the logits processor runs per row. Nothing here imports vLLM.

Each decode step the processor hands the tracker the request's committed tokens, the position its row fed and
a handle on that token's hidden states (from the model's forward). The tracker reads every token once the
token after it is committed (that one confirms a cue word's end, as lynx-exit's engine does with its
look-ahead), with the same detector and the same `LynxPolicy`; a token that is a decision point is scored
then, with the other rows' points in one call. On an exit at token j the tokens up to j + 1 stay
(`exit_prefix="lookahead"`), then the exit cue is forced token by token, then the most likely token until the
answer's `\\boxed{...}` closes (or `answer_max_tokens`), then the exit marker (`exit_marker`), which ends the
request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lynx_exit.cues import IncrementalDetokenizer
from lynx_exit.decision_points import detector_for
from lynx_exit.engine.request import brace_depth
from lynx_exit.engine.types import Decision, Step
from lynx_exit.exits.registry import MethodContext, make_policy
from lynx_exit.models import LoadedModel
from lynx_exit.vllm.scores import Handle
from lynx_exit.vllm.settings import RequestExit

GREEDY = -1  # what `ExitTracker.force` returns to force the most likely token (the forced answer)
_NO_FEATURES = torch.empty(
    0
)  # the policy reads the score the model computed; it needs to know there were features


@dataclass
class ExitTracker:
    """One request's exit state, stepped in three passes so that the decision points of all rows are scored in
    one call: `advance`, `resume` (for a point that waited for its score), `force`."""

    policy: object
    detok: IncrementalDetokenizer
    detector: object
    prompt_len: int
    exit_cue_ids: list[int]
    eos_ids: set[int]
    end_id: int  # what ends an exit's answer: the exit marker (`exit_marker`), or end of sequence
    answer_max_tokens: int
    kinds: tuple[str, ...]  # the order of the scores the model publishes
    phase: str = "think"  # think -> (answer: the model closed thinking itself) | exit -> done
    read: int = 0  # generated tokens pushed through the detector (or the detokenizer, after an exit)
    exit_index: int | None = None
    exit_point: str | None = None
    gave_up: bool = False
    # Token ids whose text holds none of the detector's completing characters
    # (`CueDetector.completing_chars`): read
    # in bulk, unscanned, with the next token that may complete something. None: every token is scanned.
    skippable: Sequence[bool] | None = None
    pending: list[int] = field(default_factory=list)  # skipped tokens, not yet decoded
    hot: bool = False  # the last scanned token left a cue word unconfirmed: scan the next one whatever it is
    handles: dict[int, Handle] = field(
        default_factory=dict
    )  # generated index -> the features of the token fed there
    waiting: Step | None = None  # a decision point read, waiting for its score
    closes: bool = False  # ... whose token also closed the thinking
    at_frontier: bool = False  # this step's row fed the request's newest token
    forced_from: int | None = None  # generated index where the exit cue starts
    answer_depth: int = 1  # the exit cue opened the box
    answer_tokens: int = 0

    def advance(self, outputs: Sequence[int], position: int, handle: Handle | None) -> Handle | None:
        """Pass 1 of a step. `outputs`: the committed generated tokens; `position`: the position of the token
        this row fed (only the request's newest token, the frontier, is acted on: a prompt chunk's sampled
        token is discarded); `handle`: that token's features. Reads what can be read; returns the features of
        a decision point that waits for its score (give the score to `resume`), else None."""
        m = len(outputs)
        self.at_frontier = position == self.prompt_len + m - 1
        if not self.at_frontier or self.phase != "think":
            return None
        handles = self.handles
        if m >= 1 and handle is not None:
            handles[m - 1] = handle
        read, skippable = self.read, self.skippable
        if read >= m - 2:
            handles.pop(m - 3, None)  # read already (what a missed step leaves goes in `_read_on`'s sweep)
        if read == m - 2 and skippable is not None and not self.hot:  # the usual step: one token to read
            token = outputs[read]
            if token < len(skippable) and skippable[token]:
                self.pending.append(token)  # completes no cue and no marker: read with the next one that may
                self.read = read + 1
                return None
        return self._read_on(outputs)

    def resume(self, outputs: Sequence[int], scores: Sequence[float]) -> Handle | None:
        """Pass 2: decide the waiting point with its scores (one per kind), then read on as `advance` does."""
        step, self.waiting = self.waiting, None
        assert step is not None and step.point is not None
        step.features, step.score = _NO_FEATURES, float(scores[self.kinds.index(step.point)])
        self._decide(step)
        return self._read_on(outputs)

    def force(self, outputs: Sequence[int]) -> int | None:
        """Pass 3: the token to force at this step, GREEDY, or None (sample freely)."""
        return self._force(outputs) if self.at_frontier and self.phase == "exit" else None

    def _read_on(self, outputs: Sequence[int]) -> Handle | None:
        skippable = self.skippable
        while self.phase == "think" and self.read < len(outputs) - 1:
            token = outputs[self.read]
            if skippable is not None and not self.hot and token < len(skippable) and skippable[token]:
                self.pending.append(token)  # completes no cue and no marker: read with the next one that may
                self.read += 1
                continue
            if self.pending:
                self.detector.append(self.detok.push_many(self.pending))  # type: ignore[attr-defined]
                self.pending = []
            step = self._detect(token, outputs[self.read + 1])
            if step is None:
                continue
            handle = self.handles.get(step.index)
            if handle is not None:
                self.waiting = step
                return handle
            self._decide(step)  # no features (the request came back after a preemption): the policy continues
        if len(self.handles) > 2:
            for index in [i for i in self.handles if i < self.read]:
                del self.handles[index]
        return None

    def _detect(self, token: int, lookahead_id: int) -> Step | None:
        """Read generated token `read` with the token after it, as lynx-exit's engine reads a fed token; the
        step if it is a decision point."""
        index = self.read
        self.read += 1
        delta = self.detok.push(token)
        lookahead = "" if lookahead_id in self.eos_ids else self.detok.peek(lookahead_id)
        detector = self.detector
        if not detector.thinking:  # type: ignore[attr-defined]
            self.phase = "answer"
            return None
        cue = detector.step(delta, lookahead)  # type: ignore[attr-defined]
        self.hot = (
            not delta or not lookahead
        )  # a cue word's end may still be confirmed by the next token's text
        point = detector.point  # type: ignore[attr-defined]
        self.closes = not detector.thinking  # type: ignore[attr-defined]
        if point is None:  # the policy only acts at decision points
            if self.closes:
                self.phase = "answer"  # the model closed its thinking: nothing left to do
            return None
        return Step(
            request_id=0, index=index, token_id=token, text=delta, phase="think", cue=cue, point=point
        )

    def _decide(self, step: Step) -> None:
        decision = self.policy.observe(step)  # type: ignore[attr-defined]
        if decision in (Decision.EXIT, Decision.GIVE_UP):
            self.phase, self.exit_index, self.exit_point = "exit", step.index, step.point
            self.gave_up = decision is Decision.GIVE_UP
            self.forced_from = step.index + 2  # the look-ahead token stays
        elif self.closes:
            self.phase = "answer"

    def _force(self, outputs: Sequence[int]) -> int:
        assert self.forced_from is not None
        start = self.forced_from + len(self.exit_cue_ids)  # generated index of the answer's first token
        for index in range(self.read, len(outputs)):
            delta = self.detok.push(outputs[index])
            if index >= start:
                self.answer_tokens += 1
                self.answer_depth = brace_depth(delta, self.answer_depth)
        self.read = len(outputs)
        k = len(outputs) - self.forced_from
        if k < len(self.exit_cue_ids):
            return self.exit_cue_ids[k]
        if self.answer_depth == 0 or self.answer_tokens >= self.answer_max_tokens:
            self.phase = "done"
            return self.end_id
        return GREEDY


def exit_marker(lm: LoadedModel) -> int | None:
    """The token an exit's forced answer ends with, listed in the request's stop tokens so that vLLM reports
    it as the finish's `stop_reason`: that is how a caller tells an exit from a natural end. A special token
    the model has no use for (the pad token when it is not an end of sequence, else the first special token
    the chat template never writes); None when there is none (the exit then ends with end of sequence and is
    not reported)."""
    tokenizer, profile = lm.tokenizer, lm.profile
    template = str(getattr(tokenizer, "chat_template", "") or "")
    taken = set(lm.eos_token_ids) | {tokenizer.bos_token_id} | set(lm.exit_cue_ids("boxed"))
    markers = {marker for marker in (profile.think_start, profile.think_end) if marker}
    candidates = sorted(
        (index, token.content) for index, token in tokenizer.added_tokens_decoder.items() if token.special
    )
    pad = tokenizer.pad_token_id
    candidates.sort(key=lambda item: item[0] != pad)  # the pad token first
    for index, content in candidates:
        if index not in taken and content not in markers and content not in template:
            return int(index)
    return None


class TrackerFactory:
    """Per process: the served model's facts and the probe, checked against each other once; `tracker` builds
    the exit state of one request."""

    def __init__(self, lm: LoadedModel, probe: str) -> None:
        self.lm, self.context = lm, MethodContext(lm=lm, probe=probe)
        self.eos_ids = lm.eos_token_ids
        eos = lm.tokenizer.eos_token_id
        self.eos_id = int(eos) if isinstance(eos, int) else min(self.eos_ids)
        self.marker = exit_marker(lm)
        self._skip_tables: dict[frozenset[str], list[bool]] = {}
        self.exit_cue_ids = lm.exit_cue_ids("boxed")

    def _skippable(self, chars: frozenset[str] | None) -> list[bool] | None:
        if chars is None:
            return None
        if chars not in self._skip_tables:
            tokenizer = self.lm.tokenizer
            ids = [[i] for i in range(len(tokenizer))]
            backend = getattr(tokenizer, "_tokenizer", None)
            pieces = (
                backend.decode_batch(ids, skip_special_tokens=False)
                if backend is not None
                else [tokenizer.decode(i, skip_special_tokens=False) for i in ids]
            )
            # A piece that is empty or not whole characters (a byte of a longer one) is always scanned.
            self._skip_tables[chars] = [bool(p) and "\ufffd" not in p and chars.isdisjoint(p) for p in pieces]
        return self._skip_tables[chars]

    def tracker(self, settings: RequestExit, prompt_len: int, stop_ids: Sequence[int] = ()) -> ExitTracker:
        """`stop_ids`: the request's stop tokens; an exit ends on the marker only where it is one of them."""
        policy = make_policy(settings.method, self.context, **dict(settings.options))
        points = policy.decision_points
        detector = detector_for(self.lm.profile, points, self.lm.profile.thinking)
        kinds = policy.bundle.kinds  # type: ignore[attr-defined]
        return ExitTracker(
            policy=policy,
            detok=IncrementalDetokenizer(self.lm.tokenizer),
            detector=detector,
            skippable=self._skippable(detector.completing_chars()),
            prompt_len=prompt_len,
            exit_cue_ids=self.exit_cue_ids,
            eos_ids=self.eos_ids,
            end_id=self.marker if self.marker is not None and self.marker in stop_ids else self.eos_id,
            answer_max_tokens=settings.answer_max_tokens,
            kinds=kinds,
        )


@dataclass(frozen=True)
class ExitReport:
    """Whether and where a vLLM request exited, read from its output: `exit_index` is the generated token the
    decision was taken at (the look-ahead token after it stays, then the exit cue)."""

    exited: bool
    exit_index: int | None = None
    answer_token_ids: tuple[int, ...] = ()


def read_exit(
    token_ids: Sequence[int], stop_reason: object, marker: int | None, exit_cue_ids: Sequence[int]
) -> ExitReport:
    """The exit of one finished output (`CompletionOutput.token_ids` and `.stop_reason`)."""
    if marker is None or stop_reason != marker:
        return ExitReport(False)
    ids, cue = list(token_ids), list(exit_cue_ids)
    # The first exit cue is the exit's: it closes the thinking, so none comes before it (a forced answer
    # that rambles may write another one after it).
    for start in range(len(ids) - len(cue) + 1):
        if ids[start : start + len(cue)] == cue:
            return ExitReport(True, start - 2, tuple(ids[start + len(cue) : -1]))
    raise ValueError(
        "the output ends on the exit marker but holds no exit cue: not an output of the lynx-exit plug-in"
    )
