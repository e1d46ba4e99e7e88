"""The one decode loop: KV-cached, batched, streaming, with cue detection and online exits.

Every consumer (CLI generate, dataset builder, evaluation, server) reads the same stream of
`Step` records; nothing else samples tokens. Exits follow LYNX spec §6: at an exit the cue
token is dropped from the row (masked out of the cache), the exit cue is fed through the
same cache, and the answer is decoded greedily until its `\\boxed{...}` closes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from lynx_exit.cues import DEFAULT_CUE_WORDS, CueDetector, IncrementalDetokenizer, compile_cue_pattern
from lynx_exit.grading import extract_boxed
from lynx_exit.models import EXIT_CUE_VARIANTS, HiddenStateCapture, LoadedModel
from lynx_exit.policies import Decision, ExitPolicy


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and exit settings; each field is one CLI flag."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0  # end-of-sequence is suppressed until this many tokens exist
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 means no top-k filter
    seed: int = 0
    exit_cue: str = "boxed"
    answer_max_tokens: int = 64
    cue_words: tuple[str, ...] = DEFAULT_CUE_WORDS
    cue_regex: str | None = None

    def __post_init__(self) -> None:
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
        if self.exit_cue not in EXIT_CUE_VARIANTS:
            raise ValueError(f"exit_cue must be one of {sorted(EXIT_CUE_VARIANTS)}, got {self.exit_cue!r}")
        compile_cue_pattern(self.cue_words, self.cue_regex)  # validates


@dataclass
class Step:
    """One token of one row, reported after the model has read it."""

    row: int
    index: int  # position among the row's generated tokens, 0-based
    token_id: int
    text: str  # text this token adds (may be "" for a partial multi-byte character)
    phase: str  # "think" | "answer" (after a natural </think>) | "exit_cue" | "forced_answer" | "end"
    cue: str | None = None  # cue word this token completes
    features: torch.Tensor | None = None  # [feature_dim] float32 hidden state of this token
    exit: bool = False  # the policy exited here (a cue token here is dropped from the output)
    finish_reason: str | None = None  # on the row's last step: "eos" | "length" | "exit"
    fork: Callable[[], ForcedAnswer] | None = field(default=None, repr=False)  # trial forced exit


@dataclass
class ForcedAnswer:
    """Greedy answer after an exit cue; `mean_prob` is the mean probability of its tokens."""

    token_ids: list[int]
    text: str
    answer: str | None
    mean_prob: float


@dataclass
class RowResult:
    row: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens kept in the output (a dropped cue token is not)
    text: str
    finish_reason: str
    exit_index: int | None  # step index where the policy exited, None if it never did
    cue_indices: list[int]
    answer: str | None
    wall_time_s: float

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


def sample_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """Sample one token id from `logits` [vocab] with temperature, top-k and top-p."""
    if config.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(scores, min(config.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        remove = cumulative - torch.softmax(sorted_scores, dim=-1) >= config.top_p  # keep the first token always
        scores = scores.scatter(0, order, sorted_scores.masked_fill(remove, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position id of each column = number of attended tokens before it. [batch, seq]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _brace_depth(text: str, depth: int) -> int:
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth <= 0:
            return 0
    return depth


@torch.inference_mode()
def forced_answers(
    lm: LoadedModel,
    cache: DynamicCache,
    attention_mask: torch.Tensor,
    rows: Sequence[int],
    keep_columns: Sequence[int],
    exit_cue_ids: Sequence[int],
    max_answer_tokens: int,
) -> list[ForcedAnswer]:
    """Batched forced exits that reuse a KV cache prefix (spec §3).

    Row i of the result continues batch row `rows[i]` of `cache` from its first
    `keep_columns[i]` cache columns: later columns are masked out, the exit cue is fed, and
    the answer is decoded greedily. `cache` itself is not modified.
    """
    if len(rows) != len(keep_columns):
        raise ValueError(f"rows ({len(rows)}) and keep_columns ({len(keep_columns)}) differ in length")
    if not rows:
        return []
    device = attention_mask.device
    missing = cache.get_seq_length() - attention_mask.shape[1]
    if missing < 0:
        raise ValueError(f"attention mask has {attention_mask.shape[1]} columns but the cache only {cache.get_seq_length()}")
    if missing:  # columns the cache gained after the mask was taken belong to no kept prefix
        attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(attention_mask.shape[0], missing)], dim=1)
    index = torch.tensor(list(rows), device=device)
    # Columns past the longest kept prefix are masked for every row: do not copy them.
    num_columns = max(keep_columns)
    fork = DynamicCache()
    layer: Any
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = layer.keys[:, :, :num_columns], layer.values[:, :, :num_columns]
        fork.update(keys.index_select(0, index), values.index_select(0, index), layer_idx)
    keep = torch.tensor(list(keep_columns), device=device)
    mask = attention_mask[:, :num_columns].index_select(0, index).clone()  # [n, seq]
    mask = mask * (torch.arange(num_columns, device=device)[None, :] < keep[:, None])
    n = len(rows)
    cue = torch.tensor(list(exit_cue_ids), device=device).repeat(n, 1)  # [n, cue_len]
    mask = torch.cat([mask, torch.ones_like(cue)], dim=1)
    positions = _positions(mask)[:, -cue.shape[1] :]
    logits = lm.model(
        input_ids=cue, attention_mask=mask, position_ids=positions, past_key_values=fork, use_cache=True, logits_to_keep=1
    ).logits[:, -1, :]
    eos = lm.eos_token_ids
    outputs: list[list[int]] = [[] for _ in range(n)]
    probs_sum = [0.0] * n
    depth = [1] * n  # the exit cue opened \boxed{
    texts = [""] * n
    active = list(range(n))
    for _ in range(max_answer_tokens):
        probs = torch.softmax(logits.float(), dim=-1)
        next_ids = probs.argmax(-1)  # [n]
        still = []
        for i in active:
            token = int(next_ids[i])
            if token in eos:
                continue
            outputs[i].append(token)
            probs_sum[i] += float(probs[i, token])
            piece = lm.tokenizer.decode(outputs[i], skip_special_tokens=True)
            depth[i] = _brace_depth(piece[len(texts[i]) :], depth[i])
            texts[i] = piece
            if depth[i] > 0:
                still.append(i)
        active = still
        if not active:
            break
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = _positions(mask)[:, -1:]
        logits = lm.model(
            input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions, past_key_values=fork, use_cache=True
        ).logits[:, -1, :]
    cue_text = lm.tokenizer.decode(list(exit_cue_ids), skip_special_tokens=False)
    results = []
    for i in range(n):
        answer = extract_boxed(cue_text[cue_text.rfind("\\boxed{") :] + texts[i]) if "\\boxed{" in cue_text else None
        mean_prob = probs_sum[i] / len(outputs[i]) if outputs[i] else 0.0
        results.append(ForcedAnswer(token_ids=outputs[i], text=texts[i], answer=answer, mean_prob=mean_prob))
    return results


@dataclass
class _Row:
    prompt_ids: list[int]
    generator: torch.Generator | None
    policy: ExitPolicy | None
    detok: IncrementalDetokenizer
    detector: CueDetector
    phase: str = "think"
    feed: int = -1  # token fed at the next forward pass
    index: int = -1  # generated index of `feed`
    forced: list[int] = field(default_factory=list)
    kept_ids: list[int] = field(default_factory=list)
    text: str = ""
    answer_depth: int = 1
    answer_tokens: int = 0
    exit_index: int | None = None
    cue_indices: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int = -1  # batch row of the cache this prompt occupies
    started: float = 0.0
    wall_time_s: float = 0.0


class DecodeLoop:
    """Batched streaming generation; iterate `steps()` or call `run()` for results."""

    def __init__(
        self,
        lm: LoadedModel,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig | None = None,
        policies: Sequence[ExitPolicy | None] | None = None,
        layers: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        """`max_batch_size` below the number of prompts turns on continuous batching: a
        finished row's slot is refilled with the next prompt. Without it, batch row i of
        `cache`/`attention_mask` is prompt i (used by forced-exit labelling after `run`)."""
        self.lm = lm
        self.config = config or GenerationConfig()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must have at least one token")
        n = len(prompts)
        if policies is not None and len(policies) != n:
            raise ValueError(f"got {len(policies)} policies for {n} prompts")
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.num_slots = min(n, max_batch_size or n)
        self._pending: deque[int] = deque()
        row_seeds = list(seeds) if seeds is not None else [self.config.seed + i for i in range(n)]
        pattern = compile_cue_pattern(self.config.cue_words, self.config.cue_regex)
        max_cue_chars = None if self.config.cue_regex else max(len(w.strip()) for w in self.config.cue_words)
        device = lm.device
        self.rows: list[_Row] = []
        for i, prompt in enumerate(prompts):
            generator = None
            if self.config.temperature > 0:
                generator = torch.Generator(device=device)
                generator.manual_seed(int(row_seeds[i]))
            policy = policies[i] if policies is not None else None
            if policy is not None:
                policy.reset()
            self.rows.append(
                _Row(
                    prompt_ids=list(prompt),
                    generator=generator,
                    policy=policy,
                    detok=IncrementalDetokenizer(lm.tokenizer),
                    detector=CueDetector(pattern, think_end=lm.profile.think_end, max_cue_chars=max_cue_chars),
                )
            )
        wants_features = any(p is not None and p.needs_features for p in (policies or []))
        if layers is None and wants_features:
            layers = lm.feature_spec().layers
        self.layers = tuple(layers) if layers else None
        self.exit_cue_ids = lm.exit_cue_ids(self.config.exit_cue)
        self.cache = DynamicCache()
        self.attention_mask = torch.zeros(0)

    def run(self) -> list[RowResult]:
        for _ in self.steps():
            pass
        return self.results()

    def results(self) -> list[RowResult]:
        return [self.result(i) for i in range(len(self.rows))]

    def result(self, i: int) -> RowResult:
        """The finished result of prompt `i` (available as soon as its last step was yielded)."""
        row = self.rows[i]
        if row.finish_reason is None:
            raise RuntimeError(f"row {i} has not finished yet")
        return RowResult(
            row=i,
            prompt_ids=row.prompt_ids,
            token_ids=row.kept_ids,
            text=row.text,
            finish_reason=row.finish_reason,
            exit_index=row.exit_index,
            cue_indices=row.cue_indices,
            answer=extract_boxed(row.text),
            wall_time_s=row.wall_time_s,
        )

    @torch.inference_mode()
    def steps(self) -> Iterator[Step]:
        """Yield one `Step` per active row per decode step until every row has finished."""
        lm = self.lm
        device = lm.device
        eos = lm.eos_token_ids
        pad = lm.pad_token_id
        capture = HiddenStateCapture(lm.model, self.layers) if self.layers else None
        try:
            first_rows = list(range(self.num_slots))
            self._pending = deque(range(self.num_slots, len(self.rows)))
            width = max(len(self.rows[i].prompt_ids) for i in first_rows)
            input_ids = torch.full((self.num_slots, width), pad, dtype=torch.long, device=device)
            mask = torch.zeros((self.num_slots, width), dtype=torch.long, device=device)
            for slot, i in enumerate(first_rows):
                prompt = self.rows[i].prompt_ids
                input_ids[slot, width - len(prompt) :] = torch.tensor(prompt)
                mask[slot, width - len(prompt) :] = 1
            logits = self._forward(input_ids, mask, _positions(mask), logits_to_keep=1)
            self.attention_mask = mask
            for slot, i in enumerate(first_rows):
                yield from self._start_row(i, slot, logits[slot], eos)
            yield from self._refill(eos)
            while True:
                active = [(row.slot, i) for i, row in enumerate(self.rows) if row.slot >= 0 and row.finish_reason is None]
                if not active:
                    return
                feed = torch.full((self.num_slots, 1), pad, dtype=torch.long, device=device)
                new_col = torch.zeros((self.num_slots, 1), dtype=torch.long, device=device)
                for slot, i in active:
                    feed[slot, 0] = self.rows[i].feed
                    new_col[slot, 0] = 1
                self.attention_mask = torch.cat([self.attention_mask, new_col], dim=1)
                logits = self._forward(feed, self.attention_mask, _positions(self.attention_mask)[:, -1:])
                features = capture.features() if capture is not None else None
                for slot, i in active:
                    row_features = features[slot] if features is not None else None
                    yield from self._advance(i, self.rows[i], logits[slot], row_features, eos)
                yield from self._refill(eos)
        finally:
            if capture is not None:
                capture.close()

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """One model call on the loop's cache; returns the last position's logits [batch, vocab]."""
        return self.lm.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        ).logits[:, -1, :]

    def _start_row(self, i: int, slot: int, logits: torch.Tensor, eos: set[int]) -> Iterator[Step]:
        row = self.rows[i]
        row.slot, row.started, row.index = slot, time.perf_counter(), 0
        first = sample_token(self._constrain(row, logits), self.config, row.generator)
        if first in eos:
            row.kept_ids.append(first)
            yield self._finish(i, row, first, "eos")
        else:
            row.feed = first

    def _refill(self, eos: set[int]) -> Iterator[Step]:
        """Continuous batching: give each finished row's slot to the next waiting prompt."""
        busy = {row.slot for row in self.rows if row.slot >= 0 and row.finish_reason is None}
        free = [slot for slot in range(self.num_slots) if slot not in busy]
        while free and self._pending:
            slot, i = free[0], self._pending.popleft()
            logits = self._splice(slot, self.rows[i].prompt_ids)
            yield from self._start_row(i, slot, logits, eos)
            if self.rows[i].finish_reason is None:
                free.pop(0)
        if self.num_slots < len(self.rows):
            self._compact()

    def _splice(self, slot: int, prompt: list[int]) -> torch.Tensor:
        """Prefill `prompt` alone and write its KV into `slot`, right-aligned; returns its last logits."""
        device = self.lm.device
        alone = DynamicCache()
        ids = torch.tensor([prompt], device=device)
        ones = torch.ones_like(ids)
        logits = self.lm.model(
            input_ids=ids, attention_mask=ones, position_ids=_positions(ones), past_key_values=alone, use_cache=True, logits_to_keep=1
        ).logits[:, -1, :]
        width, length = self.attention_mask.shape[1], len(prompt)
        if length > width:  # widen every row on the left with masked columns
            extra = length - width
            for layer in self.cache.layers:
                layer_any: Any = layer
                for name in ("keys", "values"):
                    tensor = getattr(layer_any, name)
                    setattr(layer_any, name, torch.cat([tensor.new_zeros(*tensor.shape[:2], extra, tensor.shape[3]), tensor], dim=2))
            self.attention_mask = torch.cat([self.attention_mask.new_zeros(self.num_slots, extra), self.attention_mask], dim=1)
            width = length
        for layer, fresh in zip(self.cache.layers, alone.layers, strict=True):
            layer_any, fresh_any = layer, fresh
            for name in ("keys", "values"):
                target = getattr(layer_any, name)
                target[slot].zero_()
                target[slot, :, width - length :, :] = getattr(fresh_any, name)[0]
        self.attention_mask[slot].zero_()
        self.attention_mask[slot, width - length :] = 1
        return logits[0]

    def _compact(self) -> None:
        """Drop leading cache columns that no row attends to any more."""
        used = self.attention_mask.sum(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            for layer in self.cache.layers:
                layer_any: Any = layer
                layer_any.keys = layer_any.keys[:, :, first:, :]
                layer_any.values = layer_any.values[:, :, first:, :]
            self.attention_mask = self.attention_mask[:, first:]

    def _advance(
        self, i: int, row: _Row, logits: torch.Tensor, features: torch.Tensor | None, eos: set[int]
    ) -> Iterator[Step]:
        config = self.config
        token, index = row.feed, row.index
        row.kept_ids.append(token)
        if row.phase in ("think", "answer"):
            candidate = sample_token(self._constrain(row, logits), config, row.generator)
            delta = row.detok.push(token)
            lookahead = "" if candidate in eos else row.detok.peek(candidate)  # reused by the next push
            row.text += delta
            thinking = row.detector.thinking
            cue = row.detector.step(delta, lookahead) if thinking else None
            if not row.detector.thinking:
                row.phase = "answer"
            if cue is not None:
                row.cue_indices.append(index)
            step = Step(row=i, index=index, token_id=token, text=delta, phase="think" if thinking else "answer", cue=cue)
            if thinking:
                step.features = features
                step.fork = self._fork_callback(row.slot, drop_current=cue is not None)
                if row.policy is not None and row.policy.observe(step) is Decision.EXIT:
                    step.exit = True
                    row.exit_index = index
                    if cue is not None:  # spec §3: the prefix ends before the cue token
                        self.attention_mask[row.slot, -1] = 0
                        row.kept_ids.pop()
                        row.text = row.text[: len(row.text) - len(delta)]
                        row.cue_indices.pop()
                    row.phase = "exit_cue"
                    row.forced = list(self.exit_cue_ids)
                    candidate = row.forced.pop(0)
            yield step
            yield from self._next(i, row, candidate, eos)
            return
        delta = row.detok.push(token)
        row.text += delta
        step = Step(row=i, index=index, token_id=token, text=delta, phase=row.phase)
        if row.phase == "exit_cue":
            if row.forced:
                candidate = row.forced.pop(0)
            else:
                row.phase = "forced_answer"
                candidate = int(torch.argmax(logits))
        else:  # forced_answer
            row.answer_tokens += 1
            row.answer_depth = _brace_depth(delta, row.answer_depth)
            candidate = int(torch.argmax(logits))
            if row.answer_depth == 0 or row.answer_tokens >= config.answer_max_tokens:
                step.finish_reason = "exit"
                self._close(row, "exit")
                yield step
                return
        yield step
        yield from self._next(i, row, candidate, eos)

    def _constrain(self, row: _Row, logits: torch.Tensor) -> torch.Tensor:
        """Apply min_new_tokens and a policy's banned tokens (NoWait-style logit bias, spec §9)."""
        banned = list(getattr(row.policy, "banned_token_ids", None) or ()) if row.phase == "think" else []
        if len(row.kept_ids) < self.config.min_new_tokens:
            banned += list(self.lm.eos_token_ids)
        if not banned:
            return logits
        logits = logits.clone()
        logits[banned] = float("-inf")
        return logits

    def _next(self, i: int, row: _Row, candidate: int, eos: set[int]) -> Iterator[Step]:
        """Queue `candidate` as the row's next input, or finish the row."""
        row.index += 1
        if candidate in eos and row.phase != "exit_cue":
            row.kept_ids.append(candidate)
            yield self._finish(i, row, candidate, "eos")
        elif row.phase in ("think", "answer") and len(row.kept_ids) >= self.config.max_new_tokens:
            self._close(row, "length")
            yield Step(row=i, index=row.index, token_id=-1, text="", phase="end", finish_reason="length")
        else:
            row.feed = candidate

    def _finish(self, i: int, row: _Row, token: int, reason: str) -> Step:
        self._close(row, reason)
        return Step(row=i, index=row.index, token_id=token, text="", phase="end", finish_reason=reason)

    def _close(self, row: _Row, reason: str) -> None:
        row.finish_reason = reason
        row.wall_time_s = time.perf_counter() - row.started

    def _fork_callback(self, slot: int, drop_current: bool) -> Callable[[], ForcedAnswer]:
        mask = self.attention_mask
        keep = mask.shape[1] - (1 if drop_current else 0)

        def fork() -> ForcedAnswer:
            return forced_answers(self.lm, self.cache, mask, [slot], [keep], self.exit_cue_ids, self.config.answer_max_tokens)[0]

        return fork
