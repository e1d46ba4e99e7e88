"""The request-level decode engine: requests join and leave while it runs.

`add_request` queues a prompt with its own sampling settings, seed and exit policy; `step`
advances every running request by one forward pass and returns their `Step`s; `abort` ends a
request at once. Up to `max_batch_size` requests run together and the rest wait; a finished
or aborted request frees its batch row for the next one. Generation, dataset building,
evaluation and the server all drive this engine (`DecodeLoop` is the batch-job wrapper).

Exits follow LYNX spec §6: at an exit the cue token is dropped from the request (forgotten by
the cache), the exit cue is fed through the same cache, and the answer is decoded greedily
until its `\\boxed{...}` closes.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lynx_exit.cues import CueDetector, IncrementalDetokenizer, compile_cue_pattern
from lynx_exit.engine.assist import AssistConfig, AssistState, Buffered, contains_any, ends_paragraph
from lynx_exit.engine.backend import Backend
from lynx_exit.engine.config import SEED_RANGE, GenerationConfig
from lynx_exit.engine.kv_store import KVStoreFull
from lynx_exit.engine.sampler import GREEDY, SamplingParams, mask_tokens, sample
from lynx_exit.engine.store_backend import StoreBackend
from lynx_exit.engine.types import (
    Decision,
    ExitPolicy,
    FinishReason,
    ForcedAnswer,
    Phase,
    RequestResult,
    Step,
    TrialKind,
)
from lynx_exit.models import LoadedModel, tokenizer_fingerprint
from lynx_exit.models.families import ThinkingStart
from lynx_exit.tasks.grading import extract_boxed

logger = logging.getLogger(__name__)


def brace_depth(text: str, depth: int) -> int:
    """Brace depth after `text`, starting at `depth`; 0 as soon as it closes."""
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth <= 0:
            return 0
    return depth


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=64)
def _fit_vocab(logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The assistant's logits over the thinker's vocabulary and dtype (same token ids; a head may be padded wider)."""
    vocab = like.shape[-1]
    if logits.shape[-1] < vocab:
        logits = torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))
    return logits[..., :vocab].to(like.dtype)


def check_same_tokenizer(thinker: LoadedModel, assistant: LoadedModel) -> None:
    """Speculative Thinking hands token ids from one model to the other: their tokenizers must be the same."""
    if tokenizer_fingerprint(thinker.tokenizer) != tokenizer_fingerprint(assistant.tokenizer):
        raise ValueError(f"the assistant model {assistant.model_id!r} does not share the tokenizer of {thinker.model_id!r} "
                         "(their token ids differ): choose a larger model of the same family")


def _cue_pattern(words: tuple[str, ...], regex: str | None) -> re.Pattern[str]:
    return compile_cue_pattern(words, regex)


@dataclass
class _Request:
    request_id: int
    prompt_ids: list[int]
    config: GenerationConfig
    params: SamplingParams
    generator: torch.Generator | None
    policy: ExitPolicy | None
    layers: tuple[int, ...]  # hidden-state layers this request reads ((): none)
    every_step: bool  # features at every thinking step (asked with `feature_layers`), else at cues only
    detok: IncrementalDetokenizer
    detector: CueDetector
    exit_cue_ids: list[int]
    hold: bool  # keep the cache after finishing until `release` (forced-exit labelling)
    phase: Phase = "think"
    feed: int = -1  # token fed at the next forward pass (-1: none yet)
    index: int = -1  # generated index of `feed`
    forced: deque[int] = field(default_factory=deque)
    kept_ids: list[int] = field(default_factory=list)
    text: str = ""
    answer_tokens: int = 0
    answer_depth: int = 1
    exit_index: int | None = None
    reasoning_tokens: int | None = None
    cue_indices: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    feature_columns: torch.Tensor | None = None  # columns of the captured features that are this request's
    feed_confidence: float | None = None  # DeepConf confidence of `feed` where it was sampled
    candidate_confidence: float | None = None  # ... of the token sampled at this step
    started: float = 0.0
    wall_time_s: float = 0.0
    in_cache: bool = False
    read: int = 0  # prompt tokens in the cache (a long prompt is read over several steps)
    assist: AssistState | None = None  # Speculative Thinking: who writes, and what each model did
    error: BaseException | None = None  # why it failed (finish_reason "error")


# Prompt tokens read per engine step, over all joining requests: a longer prompt is read in chunks over
# several steps while the running requests keep decoding (vLLM's chunked prefill; its default budget is 2,048-8,192).
DEFAULT_PREFILL_TOKENS = 2048


class Engine:
    """Continuous-batching decode engine over one `Backend`. Not thread-safe: one thread drives it."""

    def __init__(self, lm: LoadedModel, max_batch_size: int = 16, backend: Backend | None = None,
                 kv_cache_gb: float | None = None, prefill_tokens_per_step: int = DEFAULT_PREFILL_TOKENS,
                 compile: bool = False, assistant: LoadedModel | None = None,
                 assistant_backend: Backend | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if isinstance(prefill_tokens_per_step, bool) or not isinstance(prefill_tokens_per_step, int) or prefill_tokens_per_step < 1:
            raise ValueError(f"prefill_tokens_per_step must be a whole number >= 1, got {prefill_tokens_per_step!r}")
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.backend: Backend = backend if backend is not None else StoreBackend(lm, kv_cache_gb=kv_cache_gb, compile=compile)
        self.assistant = assistant
        self.assistant_backend: Backend | None = None
        if assistant is not None:
            check_same_tokenizer(lm, assistant)
            self.assistant_backend = assistant_backend or StoreBackend(assistant, kv_cache_gb=kv_cache_gb, compile=compile)
        self.eos_ids = lm.eos_token_ids
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[int] = deque()
        self._running: list[int] = []  # request ids holding a batch row, in admission order
        self._outbox: list[Step] = []  # steps produced outside `step` (aborts)
        self._next_id = 0
        self._layers: tuple[int, ...] = ()  # union of the running requests' layers, as captured
        self._exit_cues: dict[str, list[int]] = {}
        self._freed = False  # a row was released since the last compaction

    # -- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig | None = None,
        policy: ExitPolicy | None = None,
        seed: int | None = None,
        feature_layers: Sequence[int] | None = None,
        hold: bool = False,
        thinking: ThinkingStart | None = None,
        assist: AssistConfig | None = None,
    ) -> int:
        """Queue a request; returns its id. It joins the batch at the next `step` with a free row.

        `seed` defaults to `config.seed`. A policy's `Step.features` (its own `feature_spec`
        layers) come at cue steps; `feature_layers` asks for them at every thinking step. A policy whose feature space
        does not match this model is refused here, with both sides named. `thinking` says how this
        prompt starts thinking when its chat template was given other switches than the profile's
        (`LoadedModel.thinking_with`); by default the profile's.
        """
        config = config or GenerationConfig()
        if assist is not None and self.assistant_backend is None:
            raise ValueError("this request asks for an assistant model, but the engine was built without one "
                             "(--assistant-model)")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("every prompt must have at least one token")
        vocab = self.lm.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        seed = config.seed if seed is None else seed
        if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}), got {seed}")
        context = self.lm.context_length
        if context is not None and len(prompt) >= context:
            raise ValueError(f"the prompt is {len(prompt)} tokens but model {self.lm.model_id!r} has a context of "
                             f"{context} positions: shorten the prompt")
        layers = self._request_layers(policy, feature_layers)
        generator = None
        if not config.greedy:
            generator = torch.Generator(device=self.lm.device)
            generator.manual_seed(int(seed))
        if policy is not None:
            policy.reset()
        max_cue_chars = None if config.cue_regex else max(len(w.strip()) for w in config.cue_words)
        profile = self.lm.profile
        thinking = thinking or profile.thinking
        request_id = self._next_id
        self._next_id += 1
        self._requests[request_id] = _Request(
            request_id=request_id,
            prompt_ids=prompt,
            config=config,
            params=SamplingParams(temperature=0.0 if config.greedy else config.temperature, top_p=config.top_p,
                                  top_k=config.top_k if config.top_k < vocab else 0),  # top-k over the whole vocabulary is off
            generator=generator,
            policy=policy,
            layers=layers,
            every_step=bool(feature_layers),
            detok=IncrementalDetokenizer(self.lm.tokenizer),
            detector=CueDetector(
                _cue_pattern(config.cue_words, config.cue_regex),
                think_end=profile.think_end,
                max_cue_chars=max_cue_chars,
                think_start=profile.think_start,
                start=thinking,
            ),
            phase="think" if thinking != "off" else "answer",
            reasoning_tokens=0 if thinking == "off" else None,
            exit_cue_ids=self.exit_cue_ids(config.exit_cue),
            hold=hold,
            assist=AssistState(assist) if assist is not None else None,
        )
        self._waiting.append(request_id)
        return request_id

    def _request_layers(self, policy: ExitPolicy | None, feature_layers: Sequence[int] | None) -> tuple[int, ...]:
        wanted = tuple(feature_layers) if feature_layers else ()
        if policy is None or policy.feature_spec is None:
            if wanted:
                self.lm.feature_spec(wanted)  # validates the range
            return wanted
        spec = policy.feature_spec
        if wanted and wanted != spec.layers:
            raise ValueError(f"exit method {policy.name!r} reads layers {list(spec.layers)} but layers {list(wanted)} were asked for")
        spec.check_compatible(self.lm.feature_spec(spec.layers), what=f"exit method {policy.name!r}'s probe")
        return spec.layers

    def exit_cue_ids(self, cue: str) -> list[int]:
        """Token ids of an exit cue (a variant in the model family's format, or literal text), cached."""
        if cue not in self._exit_cues:
            self._exit_cues[cue] = self.lm.exit_cue_ids(cue)
        return self._exit_cues[cue]

    def abort(self, request_id: int) -> None:
        """End a request now; its row is free for the next step. A no-op once it has finished."""
        request = self._get(request_id)
        if request.finish_reason is not None:
            return
        if request_id in self._waiting:
            self._waiting.remove(request_id)
        self._close(request, "abort")
        self._outbox.append(self._end_step(request, -1, "abort"))

    def release(self, request_id: int) -> None:
        """Free the cache a finished `hold=True` request kept."""
        request = self._get(request_id)
        if request.finish_reason is None:
            raise ValueError(f"request {request_id} is still running; abort it instead")
        self._free(request, force=True)

    def result(self, request_id: int, forget: bool = False) -> RequestResult:
        """The result of a finished request; `forget` drops the engine's record of it."""
        request = self._get(request_id)
        if request.finish_reason is None:
            raise RuntimeError(f"request {request_id} has not finished yet")
        if forget:
            self._free(request, force=True)
            del self._requests[request_id]
        return RequestResult(
            request_id=request_id,
            prompt_ids=request.prompt_ids,
            token_ids=request.kept_ids,
            text=request.text,
            finish_reason=request.finish_reason,
            exit_index=request.exit_index,
            cue_indices=request.cue_indices,
            answer=extract_boxed(request.text),
            wall_time_s=request.wall_time_s,
            reasoning_tokens=len(request.kept_ids) if request.reasoning_tokens is None else request.reasoning_tokens,
            error=describe_error(request.error) if request.error is not None else None,
            assist=request.assist.report(len(request.kept_ids)) if request.assist is not None else None,
        )

    def error(self, request_id: int) -> BaseException | None:
        """The exception that failed a request (finish_reason "error"), else None."""
        return self._get(request_id).error

    def _get(self, request_id: int) -> _Request:
        if request_id not in self._requests:
            raise KeyError(f"unknown request id {request_id}")
        return self._requests[request_id]

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._outbox)

    def stream(self) -> Iterator[Step]:
        """Steps until every request added so far (and any added meanwhile) has finished."""
        while self.has_unfinished():
            yield from self.step()

    # -- one step ---------------------------------------------------------------------------------
    # Containment: a step shares one forward pass and one sampler call between strangers, so a fault
    # is charged to the requests that can have caused it. The rows admitted in a step are prefilled
    # apart from the running ones and bisected on failure; a sampler failure is retried row by row
    # (each row samples from its own generator, so a survivor's token is the one it would have had);
    # per-row work (detokenising, cue matching, the policy) and the batched reads after sampling
    # (features, scores, trials) fail only their own rows. A request failed this way ends with
    # finish_reason "error"; the others go on exactly as if it had never been there. Only a fault in
    # the running rows' own decode is the engine's, and `step` raises it.
    @torch.inference_mode()
    def step(self) -> list[Step]:
        """Admit waiting requests, run one forward pass for all running ones, sample once."""
        steps, self._outbox = self._outbox, []
        self._resume_thinkers()
        fed = [self._requests[r] for r in self._running if self._requests[r].feed >= 0]
        self._admit()
        parts, batch = [], list(fed)
        if fed:
            decoded = self._decode(fed)
            alive = [i for i, r in enumerate(fed) if r.finish_reason is None]
            fed = [fed[i] for i in alive]
            batch = list(fed)
            if fed:
                parts.append(decoded)
        resumed: list[_Request] = []  # requests that sample without a token fed (an assistant taking over)
        if self.assistant_backend is not None:
            parts, batch, resumed = self._assistant_pass(parts, batch)
            fed = [r for r in fed if r.finish_reason is None]
        admitted: list[_Request] = []  # requests whose whole prompt is read by this step: they sample now
        for group, logits in self._read_prompts():
            done = [i for i, r in enumerate(group) if r.read == len(r.prompt_ids)]
            if done:
                parts.append(logits if len(done) == len(group) else logits[done])
                batch += [group[i] for i in done]
                admitted += [group[i] for i in done]
        if not parts:
            return steps + self._take_outbox()
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)  # [fed + resumed + admitted, vocab]
        self._ban_tokens(logits, batch)
        sampled, alive_rows, logits = self._sample(logits, batch)
        token_ids = self._read_samples(sampled, logits, alive_rows) if alive_rows else []  # the step's one host sync
        by_request = dict(zip([r.request_id for r in alive_rows], token_ids, strict=True))
        now = time.perf_counter()
        for request in admitted + resumed:
            if request.request_id not in by_request:
                continue
            if request in admitted:
                request.started, request.index = now, -1  # `_next` makes the first token index 0
            try:
                steps += self._next(request, by_request[request.request_id])
                if request.assist is not None:
                    self._after_sample(request, by_request[request.request_id])
            except Exception as exc:
                self._fail(request, exc)
        fed = [r for r in fed if r.request_id in by_request]
        steps += self._advance_all(fed, [by_request[r.request_id] for r in fed])
        self._after_step()
        return steps + self._take_outbox()

    # -- Speculative Thinking -------------------------------------------------------------------
    def _resume_thinkers(self) -> None:
        """A thinker that takes its turn back without a token to read (its look-ahead was dropped, official
        schedule) re-reads its last token to sample the next one."""
        if self.assistant_backend is None:  # nothing to do on the decode path without an assistant
            return
        for request_id in self._running:
            request = self._requests[request_id]
            if request.assist is not None and request.assist.resume == "thinker" and request.finish_reason is None:
                tokens = len(request.prompt_ids) + len(request.kept_ids)
                self.backend.truncate(request_id, tokens - 1)
                request.feed = (request.prompt_ids + request.kept_ids)[-1]

    def _assistant_pass(self, parts: list[torch.Tensor], batch: list[_Request]
                        ) -> tuple[list[torch.Tensor], list[_Request], list[_Request]]:
        """The assistant reads, in one pass, what each request it writes for holds and it has not seen; its
        logits replace the thinker's for those rows (or add a row for a request that has no token fed)."""
        assert self.assistant_backend is not None
        rows = [self._requests[r] for r in self._running]
        rows = [r for r in rows if r.assist is not None and r.assist.driver == "assistant" and r.finish_reason is None
                and not r.assist.forced and (r.feed >= 0 or r.assist.resume == "assistant")]
        if not rows:
            return parts, batch, []
        logits_by_id = self._assistant_read(rows)
        like = parts[0] if parts else next(iter(logits_by_id.values()))
        fed_ids = [r.request_id for r in batch]
        if parts and any(r.request_id in logits_by_id for r in batch):
            decoded = parts[0].clone()
            for i, request_id in enumerate(fed_ids):
                if request_id in logits_by_id:
                    decoded[i] = _fit_vocab(logits_by_id[request_id], like)
            parts = [decoded, *parts[1:]]
        resumed = [r for r in rows if r.request_id not in fed_ids and r.request_id in logits_by_id]
        if resumed:
            parts = [*parts, torch.stack([_fit_vocab(logits_by_id[r.request_id], like) for r in resumed])]
            batch = [*batch, *resumed]
        for request in resumed:
            assert request.assist is not None
            request.assist.resume = None
        return parts, batch, resumed

    def _assistant_read(self, rows: list[_Request]) -> dict[int, torch.Tensor]:
        """One assistant pass (a first read is a prefill, later ones extend); a row that fails fails alone."""
        assert self.assistant_backend is not None
        out: dict[int, torch.Tensor] = {}
        groups = {first: [r for r in rows if r.assist is not None and (r.assist.synced == 0) == first] for first in (True, False)}
        for first, group in groups.items():
            read = self.assistant_backend.prefill if first else self.assistant_backend.extend
            items = []
            for request in group:
                assert request.assist is not None
                tokens = request.prompt_ids + request.kept_ids + ([request.feed] if request.feed >= 0 else [])
                if request.assist.synced >= len(tokens):  # it holds everything already: re-read the last token
                    request.assist.synced = len(tokens) - 1
                    self.assistant_backend.truncate(request.request_id, request.assist.synced)
                items.append((request, tokens[request.assist.synced :]))
            lengths = {r.request_id: len(chunk) for r, chunk in items}
            for members, logits in self._read_chunks(items, read, prompt=False):
                for i, request in enumerate(members):
                    assert request.assist is not None
                    if not request.assist.takeover_ids:  # the first pass of a takeover: a hand-over read
                        request.assist.assistant_read += lengths[request.request_id]
                    request.assist.synced += lengths[request.request_id]
                    out[request.request_id] = logits[i]
        return out

    def _after_sample(self, request: _Request, candidate: int) -> None:
        """Count what the assistant wrote; end its takeover (or extend it once for a verify word)."""
        assist = request.assist
        assert assist is not None
        if assist.driver != "assistant" or assist.forced or request.finish_reason is not None:
            return
        assist.assistant_tokens += 1
        assist.wrote(request.index)
        assist.takeover_ids.append(candidate)
        assist.left -= 1
        config = assist.config
        written = len(assist.takeover_ids)
        if (written < config.takeover if config.to_break else assist.left > 0):
            return
        decode = self.lm.tokenizer.decode
        text = decode(assist.takeover_ids, skip_special_tokens=True)
        if config.to_break:  # on to the end of the paragraph: `takeover` tokens at least, the extension at most
            if not ends_paragraph(text, decode([candidate]), config.trigger) and written < config.takeover + config.verify_extension:
                return
        elif not assist.extended and config.verify_extension and contains_any(text, config.verify_words):
            assist.left, assist.extended = config.verify_extension, True
            assist.verify_extensions += 1
            return
        if config.sentiment(text) < 0:
            assist.negatives += 1
        assist.driver, assist.takeover_ids, assist.extended = "thinker", [], False

    def _maybe_assist(self, request: _Request, step: Step) -> None:
        """After the thinker commits a token: at a paragraph break while thinking, start a look-ahead, or
        (after too many negative takeovers) write the recap sentence and hand over."""
        assist = request.assist
        assert assist is not None
        config = assist.config
        if (assist.driver != "thinker" or assist.lookahead is not None or step.phase != "think" or request.feed < 0
                or request.phase != "think" or not ends_paragraph(request.text, step.text, config.trigger)):
            return
        if assist.negatives >= assist.recap_after:  # too much reflection: a recap, written by the assistant
            recap = self.lm.tokenizer.encode(config.recap_text, add_special_tokens=False)
            request.feed, assist.forced = recap[0], recap[1:]
            assist.driver, assist.left, assist.takeover_ids, assist.extended = "assistant", assist.recap_tokens, [], True
            assist.negatives = 0
            assist.recap_tokens = min(assist.recap_tokens + config.recap_tokens_growth, config.recap_tokens_max)
            assist.recap_after = min(assist.recap_after + config.recap_after_growth, config.recap_after_max)
            assist.recaps += 1
            assist.takeovers += 1
            return
        assist.lookahead = []
        assist.lookaheads += 1

    def _buffer(self, request: _Request, candidate: int) -> list[Step]:
        """A look-ahead token was read: keep it aside; when the look-ahead is complete, decide."""
        assist = request.assist
        assert assist is not None and assist.lookahead is not None
        features = None
        if request.layers:
            features = self.backend.hidden_states([request.request_id])[0]
        assist.lookahead.append(Buffered(request.feed, request.index, request.feed_confidence, features))
        written = len(request.kept_ids) + len(assist.lookahead)
        full = (len(assist.lookahead) >= assist.config.lookahead or candidate in self.eos_ids
                or written >= request.config.max_new_tokens)
        if not full:
            request.index += 1
            request.feed = candidate
            request.feed_confidence, request.candidate_confidence = request.candidate_confidence, None
            return []
        buffered, assist.lookahead = assist.lookahead, None
        text = self.lm.tokenizer.decode([b.token_id for b in buffered], skip_special_tokens=True)
        keyword = assist.config.keywords.search(text) is not None
        if keyword or not assist.config.keep_lookahead:  # roll the thinker back to the paragraph break
            self.backend.truncate(request.request_id, len(request.prompt_ids) + len(request.kept_ids))
            assist.lookahead_tokens_discarded += len(buffered)
            request.feed, request.index = -1, len(request.kept_ids) - 1
            request.feed_confidence = request.candidate_confidence = None
            if keyword:
                assist.driver, assist.left, assist.takeover_ids, assist.extended = "assistant", assist.config.takeover, [], False
                assist.resume = "assistant"
                assist.takeovers += 1
            else:
                assist.resume = "thinker"
            return []
        return self._replay(request, buffered, candidate)

    def _replay(self, request: _Request, buffered: list[Buffered], candidate: int) -> list[Step]:
        """Commit a kept look-ahead token by token, as if read one per step (cues, features, policy, exit)."""
        steps: list[Step] = []
        for j, item in enumerate(buffered):
            after = buffered[j + 1].token_id if j + 1 < len(buffered) else candidate
            request.feed, request.index, request.feed_confidence = item.token_id, item.index, item.confidence
            step = self._read(request, after)
            if item.features is not None and step.phase == "think" and (request.every_step or step.cue is not None):
                step.features = item.features if request.feature_columns is None else item.features[request.feature_columns]
            read = [(request, step, after)]
            for stage in (self._score, self._run_trials):
                self._batched(stage, read)
            if request.finish_reason is not None:
                return steps
            steps.append(step)
            if step.phase == "think" and request.policy is not None and request.policy.observe(step) is Decision.EXIT:
                return steps + self._next(request, self._exit(request, step))
        return steps + self._next(request, candidate)

    def _take_outbox(self) -> list[Step]:
        steps, self._outbox = self._outbox, []
        return steps

    def _decode(self, fed: list[_Request]) -> torch.Tensor:
        """One decode pass; requests the KV store cannot grow for fail alone (named by the store), the rest go on."""
        try:
            return self.backend.decode([r.request_id for r in fed], [r.feed for r in fed])
        except KVStoreFull as exc:
            over = set(exc.request_ids)
            if not over:
                raise
            for request in fed:
                if request.request_id in over:
                    self._fail(request, exc)
            self._after_step()  # their slots are free (and compacted) before the others decode
            rest = [r for r in fed if r.finish_reason is None]
            if not rest:
                return torch.empty((0, self.lm.vocab_size), device=self.lm.device)
            return self._decode(rest)

    def _read_prompts(self) -> list[tuple[list[_Request], torch.Tensor]]:
        """Read the next chunk of every prompt still being read, in admission order, within the step's token
        budget (the first request always gets at least one token). Returns the groups read and their logits."""
        budget = self.prefill_tokens_per_step
        first: list[tuple[_Request, list[int]]] = []
        more: list[tuple[_Request, list[int]]] = []
        for request_id in self._running:
            request = self._requests[request_id]
            left = len(request.prompt_ids) - request.read
            if left <= 0 or request.finish_reason is not None or budget <= 0:
                continue
            take = min(left, budget)
            budget -= take
            (first if request.read == 0 else more).append((request, request.prompt_ids[request.read : request.read + take]))
        out = self._read_chunks(first, self.backend.prefill) if first else []
        return out + (self._read_chunks(more, self.backend.extend) if more else [])

    def _read_chunks(self, items: list[tuple[_Request, list[int]]], read: Callable[[list[int], list[list[int]]], torch.Tensor],
                     prompt: bool = True) -> list[tuple[list[_Request], torch.Tensor]]:
        """Read one chunk per request (of its prompt, or for the assistant); on failure bisect them, failing each
        one that fails alone."""
        if not items:
            return []
        try:
            logits = read([r.request_id for r, _ in items], [chunk for _, chunk in items])
        except Exception as exc:  # a backend keeps no part of a batch it failed to read
            if len(items) == 1:
                request = items[0][0]
                if prompt:
                    request.in_cache = request.read > 0  # a first chunk that failed left nothing in the cache
                self._fail(request, exc)
                return []
            half = len(items) // 2
            return self._read_chunks(items[:half], read, prompt) + self._read_chunks(items[half:], read, prompt)
        if prompt:
            for request, chunk in items:
                request.read += len(chunk)
        return [([r for r, _ in items], logits)]

    def _sample(self, logits: torch.Tensor, batch: list[_Request]) -> tuple[torch.Tensor, list[_Request], torch.Tensor]:
        """Sampled ids [n] for the rows of `batch` still alive, those rows and their logits; a failing row fails alone."""

        def params(rows: list[_Request]) -> tuple[list[SamplingParams], list[torch.Generator | None]]:
            sampling = [r.phase in ("think", "answer") for r in rows]
            return ([r.params if s else GREEDY for r, s in zip(rows, sampling, strict=True)],
                    [r.generator if s else None for r, s in zip(rows, sampling, strict=True)])

        try:
            return sample(logits, *params(batch)), batch, logits
        except Exception:  # the filters run before any row draws from its generator: a retry is exact
            picks, alive, rows = [], [], []
            for i, request in enumerate(batch):
                try:
                    picks.append(sample(logits[i : i + 1], *params([request])))
                except Exception as exc:
                    self._fail(request, exc)
                    continue
                alive.append(request)
                rows.append(i)
            if not alive:
                return logits.new_zeros(0, dtype=torch.long), [], logits[:0]
            return torch.cat(picks), alive, logits.index_select(0, torch.tensor(rows, device=logits.device))

    def _read_samples(self, sampled: torch.Tensor, logits: torch.Tensor, batch: list[_Request]) -> list[int]:
        """The sampled ids on the host; with them, in the same sync, DeepConf token confidences for the
        thinking rows whose policy asks (the negative mean log-probability of their top-k tokens)."""
        wanted = [(i, r.policy.confidence_top_k) for i, r in enumerate(batch)
                  if r.phase == "think" and r.policy is not None and r.policy.confidence_top_k > 0]
        if not wanted:
            return [int(t) for t in sampled.tolist()]
        k = max(top_k for _, top_k in wanted)
        rows = torch.tensor([i for i, _ in wanted], device=logits.device)
        top = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1).topk(k, dim=-1).values  # [n, k]
        ks = torch.tensor([top_k for _, top_k in wanted], device=logits.device)
        in_k = torch.arange(k, device=logits.device)[None, :] < ks[:, None]
        confidence = -(top.clamp_min(-1e4) * in_k).sum(-1) / ks  # [n]
        host = torch.cat([sampled.double(), confidence.double()]).tolist()
        for (i, _), value in zip(wanted, host[len(batch) :], strict=True):
            batch[i].candidate_confidence = value
        return [int(t) for t in host[: len(batch)]]

    def _admit(self) -> list[_Request]:
        admitted = []
        while self._waiting and len(self._running) < self.max_batch_size:
            request = self._requests[self._waiting.popleft()]
            self._running.append(request.request_id)
            request.in_cache = True
            admitted.append(request)
        if admitted:
            self._update_layers()
        return admitted

    def _ban_tokens(self, logits: torch.Tensor, batch: list[_Request]) -> None:
        """min_new_tokens and policies' banned tokens (NoWait-style logit bias, spec §9), one call."""
        rows: list[int] = []
        token_ids: list[int] = []
        for row, request in enumerate(batch):
            if request.phase not in ("think", "answer"):
                continue
            policy_bans = request.policy.banned_token_ids if request.phase == "think" and request.policy is not None else ()
            pending = len(request.assist.lookahead) if request.assist is not None and request.assist.lookahead else 0
            no_eos = len(request.kept_ids) + pending + (request.feed >= 0) < request.config.min_new_tokens
            if not policy_bans and not no_eos:
                continue
            banned = set(policy_bans) | (self.eos_ids if no_eos else set())
            rows += [row] * len(banned)
            token_ids += sorted(banned)
        mask_tokens(logits, rows, token_ids)

    def _advance_all(self, fed: list[_Request], token_ids: list[int]) -> list[Step]:
        """Read the tokens just fed: text, cues, features, batched scores, policy decisions, next inputs."""
        steps: list[Step] = []
        reads: list[tuple[_Request, Step, int]] = []
        for request, candidate in zip(fed, token_ids, strict=True):
            try:
                assist = request.assist
                if assist is not None and assist.resume == "thinker":  # re-read its last token: nothing new
                    assist.resume = None
                    steps += self._next(request, candidate)
                elif assist is not None and assist.lookahead is not None and request.phase == "think":
                    steps += self._buffer(request, candidate)
                elif request.phase in ("think", "answer"):
                    reads.append((request, self._read(request, candidate), candidate))
                else:
                    steps += self._forced(request, candidate)
            except Exception as exc:
                self._fail(request, exc)
        for stage in (self._attach_features, self._score, self._run_trials):
            self._batched(stage, [read for read in reads if read[0].finish_reason is None])
        for request, step, candidate in reads:
            if request.finish_reason is not None:  # failed in a batched read
                continue
            try:
                exited = step.phase == "think" and request.policy is not None and request.policy.observe(step) is Decision.EXIT
                if exited:
                    candidate = self._exit(request, step)
                forced = not exited and request.assist is not None and bool(request.assist.forced)
                if forced:  # the recap sentence, token by token, instead of what was sampled
                    assert request.assist is not None
                    candidate = request.assist.forced.pop(0)
                after = self._next(request, candidate)
                if request.assist is not None and not exited and not forced and request.finish_reason is None:
                    self._maybe_assist(request, step)  # only where the thinker sampled what comes next
                    self._after_sample(request, candidate)
            except Exception as exc:
                self._fail(request, exc)
                continue
            steps.append(step)
            steps += after
        return steps

    def _batched(self, stage: Callable[[list[tuple[_Request, Step, int]]], None], reads: list[tuple[_Request, Step, int]]) -> None:
        """Run a batched read over all rows; if it raises, over each row alone, failing the rows that raise again.
        The stages only attach results to their steps, so a rerun is harmless."""
        if not reads:
            return
        try:
            stage(reads)
        except Exception as exc:
            if len(reads) == 1:
                self._fail(reads[0][0], exc)
                return
            for read in reads:
                self._batched(stage, [read])

    def _fail(self, request: _Request, exc: BaseException) -> None:
        """End one request with finish_reason "error"; the rest of the batch is untouched."""
        if request.finish_reason is not None:
            return
        logger.warning("request %d failed and was ended alone: %s", request.request_id, describe_error(exc))
        request.error = exc
        if request.request_id in self._waiting:
            self._waiting.remove(request.request_id)
        self._close(request, "error")
        step = self._end_step(request, -1, "error")
        step.error = describe_error(exc)
        self._outbox.append(step)

    def _attach_features(self, reads: list[tuple[_Request, Step, int]]) -> None:
        """Hidden states of the steps that need them, read from the backend in one call."""
        wanted = [(r, s) for r, s, _ in reads if s.phase == "think" and r.layers and (r.every_step or s.cue is not None)]
        if not wanted:
            return
        states = self.backend.hidden_states([r.request_id for r, _ in wanted])  # [n, len(union) * hidden]
        for i, (request, step) in enumerate(wanted):
            step.features = states[i] if request.feature_columns is None else states[i, request.feature_columns]

    def _read(self, request: _Request, candidate: int) -> Step:
        token, index = request.feed, request.index
        request.kept_ids.append(token)
        delta = request.detok.push(token)
        lookahead = "" if candidate in self.eos_ids else request.detok.peek(candidate)  # reused by the next push
        request.text += delta
        thinking = request.detector.thinking
        cue = request.detector.step(delta, lookahead) if thinking else None
        if thinking and not request.detector.thinking:
            request.phase, request.reasoning_tokens = "answer", len(request.kept_ids)
        if cue is not None:
            request.cue_indices.append(index)
        step = Step(request_id=request.request_id, index=index, token_id=token, text=delta, phase="think" if thinking else "answer",
                    cue=cue, confidence=request.feed_confidence)
        if thinking and request.policy is not None:
            step.fork = self._fork_callback(request, drop_current=cue is not None)
        return step

    def _run_trials(self, reads: list[tuple[_Request, Step, int]]) -> None:
        """The trial decodes the policies ask for at this step: one batched fork per kind (and exit cue)."""
        groups: dict[tuple[TrialKind, tuple[int, ...], int], list[tuple[Step, tuple[int, int]]]] = {}
        for request, step, _ in reads:
            if step.phase != "think" or request.policy is None:
                continue
            kind = request.policy.trial_at(step)
            if kind is None:
                continue
            keep = self._trial_prefix(request, drop_current=step.cue is not None)
            max_tokens = request.config.answer_max_tokens if kind == "answer" else 0
            key = (kind, tuple(request.exit_cue_ids), max_tokens)
            groups.setdefault(key, []).append((step, (request.request_id, keep)))
        for (_, forced, max_tokens), members in groups.items():
            trials = self._fork([item for _, item in members], list(forced), max_tokens)
            for (step, _), trial in zip(members, trials, strict=True):
                step.trial = trial

    def _score(self, reads: list[tuple[_Request, Step, int]]) -> None:
        """Score the features of every cue step that has a scorer, one call per scorer."""
        groups: dict[int, list[Step]] = {}
        scorers = {}
        for request, step, _ in reads:
            scorer = request.policy.scorer if request.policy is not None else None
            if step.cue is not None and step.features is not None and scorer is not None:
                groups.setdefault(id(scorer), []).append(step)
                scorers[id(scorer)] = scorer
        for key, group in groups.items():
            scores = scorers[key](torch.stack([s.features for s in group])).tolist()  # type: ignore[misc]
            for step, score in zip(group, scores, strict=True):
                step.score = float(score)

    def _exit(self, request: _Request, step: Step) -> int:
        """Apply an exit decision at `step`; returns the first exit-cue token to feed."""
        step.exit = True
        request.exit_index = step.index
        if step.cue is not None:  # spec §3: the prefix ends before the cue token
            request.kept_ids.pop()
            self.backend.truncate(request.request_id, len(request.prompt_ids) + len(request.kept_ids))
            request.text = request.text[: len(request.text) - len(step.text)]
            request.cue_indices.pop()
        request.phase, request.reasoning_tokens = "exit_cue", len(request.kept_ids)
        if request.assist is not None:  # the answer after an exit is the thinker's
            request.assist.driver, request.assist.left, request.assist.forced = "thinker", 0, []
            request.assist.lookahead = None
        request.forced = deque(request.exit_cue_ids)
        return request.forced.popleft()

    def _forced(self, request: _Request, greedy_id: int) -> list[Step]:
        """A token of the exit cue or of the forced answer was read."""
        token = request.feed
        request.kept_ids.append(token)
        delta = request.detok.push(token)
        request.text += delta
        step = Step(request_id=request.request_id, index=request.index, token_id=token, text=delta, phase=request.phase)
        if request.phase == "exit_cue":
            if request.forced:
                return [step, *self._next(request, request.forced.popleft())]
            request.phase = "forced_answer"
            return [step, *self._next(request, greedy_id)]
        request.answer_tokens += 1
        request.answer_depth = brace_depth(delta, request.answer_depth)
        if request.answer_depth == 0 or request.answer_tokens >= request.config.answer_max_tokens:
            step.finish_reason = "exit"
            self._close(request, "exit")
            return [step]
        return [step, *self._next(request, greedy_id)]

    def _next(self, request: _Request, candidate: int) -> list[Step]:
        """Queue `candidate` as the request's next input, or finish it."""
        request.index += 1
        if candidate in self.eos_ids and request.phase != "exit_cue":
            request.kept_ids.append(candidate)
            self._close(request, "eos")
            return [self._end_step(request, candidate, "eos")]
        context = self.lm.context_length
        if (request.phase in ("think", "answer") and len(request.kept_ids) >= request.config.max_new_tokens) or (
                context is not None and len(request.prompt_ids) + len(request.kept_ids) >= context):
            self._close(request, "length")  # the budget, or the model's last position
            return [self._end_step(request, -1, "length")]
        request.feed = candidate
        request.feed_confidence, request.candidate_confidence = request.candidate_confidence, None
        return []

    def _end_step(self, request: _Request, token_id: int, reason: FinishReason) -> Step:
        return Step(request_id=request.request_id, index=request.index, token_id=token_id, text="", phase="end", finish_reason=reason)

    def _close(self, request: _Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        request.wall_time_s = time.perf_counter() - request.started if request.started else 0.0
        if request.reasoning_tokens is None and request.phase == "think":
            request.reasoning_tokens = len(request.kept_ids)
        if request.request_id in self._running:
            self._running.remove(request.request_id)
        self._free(request, force=False)

    def _free(self, request: _Request, force: bool) -> None:
        if request.in_cache and (force or not request.hold):
            request.in_cache = False
            self.backend.release(request.request_id)
            self._freed = True
        if (request.assist is not None and request.assist.synced and self.assistant_backend is not None
                and (force or not request.hold)):
            request.assist.synced = 0
            self.assistant_backend.release(request.request_id)
            self._freed = True

    def _after_step(self) -> None:
        if self._freed:  # trim columns now; drop free rows only if no waiting request will take them
            self.backend.compact(drop_rows=not self._waiting)
            if self.assistant_backend is not None:
                self.assistant_backend.compact(drop_rows=not self._waiting)
            self._freed = False
        if not self._running and self._layers:
            self._update_layers()

    def _update_layers(self) -> None:
        """Hook the union of the running requests' layers; give each request its own columns of it."""
        running = [self._requests[r] for r in self._running]
        union = tuple(sorted({layer for r in running for layer in r.layers}))
        if union != self._layers:
            self.backend.capture(union)
            self._layers = union
        hidden = int(self.lm.model.config.hidden_size)
        for request in running:
            if request.layers in ((), union):
                request.feature_columns = None
            else:
                starts = [union.index(layer) * hidden for layer in request.layers]
                request.feature_columns = torch.cat([torch.arange(s, s + hidden) for s in starts]).to(self.lm.device)

    # -- forced exits --------------------------------------------------------------------------
    def forced_answers(
        self, items: Sequence[tuple[int, int]], exit_cue_ids: Sequence[int], max_answer_tokens: int
    ) -> list[ForcedAnswer]:
        """Batched forced exits (spec §3): item i continues request `items[i][0]` from its first
        `items[i][1]` generated tokens with the exit cue and a greedy answer; requests are untouched."""
        prefix = [(request_id, len(self._get(request_id).prompt_ids) + kept) for request_id, kept in items]
        return self._fork(prefix, list(exit_cue_ids), max_answer_tokens)

    def _fork(self, items: Sequence[tuple[int, int]], exit_cue_ids: list[int], max_answer_tokens: int) -> list[ForcedAnswer]:
        tokenizer = self.lm.tokenizer

        def done(_i: int, token_ids: list[int]) -> bool:  # the exit cue opened \boxed{
            return brace_depth(tokenizer.decode(token_ids, skip_special_tokens=True), 1) == 0

        outputs = self.backend.fork(items, exit_cue_ids, max_answer_tokens, self.eos_ids, done)
        cue_text = tokenizer.decode(exit_cue_ids, skip_special_tokens=False)
        boxed_at = cue_text.rfind("\\boxed{")
        results = []
        for token_ids, probs, entropy in outputs:
            text = tokenizer.decode(token_ids, skip_special_tokens=True)
            answer = extract_boxed(cue_text[boxed_at:] + text) if boxed_at >= 0 else None
            mean_prob = sum(probs) / len(probs) if probs else 0.0
            results.append(ForcedAnswer(token_ids, text, answer, mean_prob, len(exit_cue_ids), entropy))
        return results

    @staticmethod
    def _trial_prefix(request: _Request, drop_current: bool) -> int:
        """Tokens a trial from this step keeps: prompt and generated ones, less a cue token (spec §3)."""
        return len(request.prompt_ids) + len(request.kept_ids) - (1 if drop_current else 0)

    def _fork_callback(self, request: _Request, drop_current: bool) -> Callable[[], ForcedAnswer]:
        # A partial, not a closure: it is made for every thinking step of every row (hot path).
        keep = self._trial_prefix(request, drop_current)
        return functools.partial(self._fork_one, request.request_id, keep, request.exit_cue_ids, request.config.answer_max_tokens)

    def _fork_one(self, request_id: int, keep: int, exit_cue_ids: list[int], max_answer_tokens: int) -> ForcedAnswer:
        return self._fork([(request_id, keep)], exit_cue_ids, max_answer_tokens)[0]
