"""The one decode loop: KV-cached, batched, streaming, with cue detection and online exits.

Every consumer (CLI generate, dataset builder, evaluation, server) reads the same stream of
`Step` records; nothing else samples tokens. Exits follow LYNX spec §6: at an exit the cue
token is dropped from the row (masked out of the cache), the exit cue is fed through the
same cache, and the answer is decoded greedily until its `\\boxed{...}` closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

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
    fork = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        fork.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), layer_idx)
    num_columns = attention_mask.shape[1]
    keep = torch.tensor(list(keep_columns), device=device)
    mask = attention_mask.index_select(0, index).clone()  # [n, seq]
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
    ) -> None:
        self.lm = lm
        self.config = config or GenerationConfig()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must have at least one token")
        n = len(prompts)
        if policies is not None and len(policies) != n:
            raise ValueError(f"got {len(policies)} policies for {n} prompts")
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
        row_seeds = list(seeds) if seeds is not None else [self.config.seed + i for i in range(n)]
        pattern = compile_cue_pattern(self.config.cue_words, self.config.cue_regex)
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
                    detector=CueDetector(pattern, think_end=lm.profile.think_end),
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
        out = []
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                raise RuntimeError("results() called before the loop finished")
            answer = extract_boxed(row.text)
            out.append(
                RowResult(
                    row=i,
                    prompt_ids=row.prompt_ids,
                    token_ids=row.kept_ids,
                    text=row.text,
                    finish_reason=row.finish_reason,
                    exit_index=row.exit_index,
                    cue_indices=row.cue_indices,
                    answer=answer,
                    wall_time_s=row.wall_time_s,
                )
            )
        return out

    @torch.inference_mode()
    def steps(self) -> Iterator[Step]:
        lm, config = self.lm, self.config
        device = lm.device
        eos = lm.eos_token_ids
        pad = lm.pad_token_id
        capture = HiddenStateCapture(lm.model, self.layers) if self.layers else None
        try:
            width = max(len(r.prompt_ids) for r in self.rows)
            input_ids = torch.full((len(self.rows), width), pad, dtype=torch.long, device=device)
            mask = torch.zeros((len(self.rows), width), dtype=torch.long, device=device)
            for i, row in enumerate(self.rows):
                input_ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
                mask[i, width - len(row.prompt_ids) :] = 1
            start = time.perf_counter()
            logits = lm.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=_positions(mask),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
            self.attention_mask = mask
            for i, row in enumerate(self.rows):
                row.started = start
                first = sample_token(logits[i], config, row.generator)
                row.index = 0
                if first in eos:
                    row.kept_ids.append(first)
                    yield self._finish(i, row, first, "eos")
                else:
                    row.feed = first
            while True:
                active = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
                if not active:
                    return
                feed = torch.full((len(self.rows), 1), pad, dtype=torch.long, device=device)
                new_col = torch.zeros((len(self.rows), 1), dtype=torch.long, device=device)
                for i in active:
                    feed[i, 0] = self.rows[i].feed
                    new_col[i, 0] = 1
                mask = torch.cat([self.attention_mask, new_col], dim=1)
                self.attention_mask = mask
                logits = lm.model(
                    input_ids=feed,
                    attention_mask=mask,
                    position_ids=_positions(mask)[:, -1:],
                    past_key_values=self.cache,
                    use_cache=True,
                ).logits[:, -1, :]
                features = capture.features() if capture is not None else None
                for i in active:
                    yield from self._advance(i, self.rows[i], logits[i], features[i] if features is not None else None, eos)
        finally:
            if capture is not None:
                capture.close()

    def _advance(
        self, i: int, row: _Row, logits: torch.Tensor, features: torch.Tensor | None, eos: set[int]
    ) -> Iterator[Step]:
        config = self.config
        token, index = row.feed, row.index
        row.kept_ids.append(token)
        if row.phase in ("think", "answer"):
            banned = getattr(row.policy, "banned_token_ids", None)
            if banned and row.phase == "think":  # NoWait-style logit bias (spec §9)
                logits = logits.clone()
                logits[list(banned)] = float("-inf")
            candidate = sample_token(logits, config, row.generator)
            lookahead = "" if candidate in eos else row.detok.peek(candidate)
            delta = row.detok.push(token)
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
                step.fork = self._fork_callback(i, drop_current=cue is not None)
                if row.policy is not None and row.policy.observe(step) is Decision.EXIT:
                    step.exit = True
                    row.exit_index = index
                    if cue is not None:  # spec §3: the prefix ends before the cue token
                        self.attention_mask[i, -1] = 0
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

    def _fork_callback(self, i: int, drop_current: bool) -> Callable[[], ForcedAnswer]:
        mask = self.attention_mask
        keep = mask.shape[1] - (1 if drop_current else 0)

        def fork() -> ForcedAnswer:
            return forced_answers(self.lm, self.cache, mask, [i], [keep], self.exit_cue_ids, self.config.answer_max_tokens)[0]

        return fork
