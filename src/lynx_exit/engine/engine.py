"""The request-level decode engine: requests join and leave while it runs.

`add_request` queues a prompt with its own sampling settings, seed and exit policy; `step` advances every
running request by one forward pass and returns their `Step`s; `abort` ends a request at once. Up to
`max_batch_size` requests run together (and what the KV budget holds) and the rest wait. Generation, dataset
building, evaluation and the server all drive this engine (`DecodeLoop` is the batch-job wrapper).

The parts, as in nano-vllm: `scheduler` (waiting and running requests, admission, preemption, the prefill
budget), `runner` (backend passes and the sampler, with one way to contain a fault), `postprocess` (what a
sampled token does to its request; exits per how-it-works §6), `forks` (forced answers and trial decodes), and
a plug-in with named hooks (`plugin`; Speculative Thinking in `speculative`)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from lynx_exit.cues import IncrementalDetokenizer
from lynx_exit.decision_points import detector_for
from lynx_exit.engine import overlap
from lynx_exit.engine.assist import AssistConfig
from lynx_exit.engine.backend import Backend
from lynx_exit.engine.config import SEED_RANGE, EngineConfig, GenerationConfig, compiles_on
from lynx_exit.engine.forks import Forks
from lynx_exit.engine.overlap import Ahead, AheadBackend
from lynx_exit.engine.plugin import EnginePlugin
from lynx_exit.engine.postprocess import Postprocessor
from lynx_exit.engine.request import Batch, Request, describe_error, request_layers
from lynx_exit.engine.runner import Runner
from lynx_exit.engine.sampler import SamplingParams
from lynx_exit.engine.scheduler import DEFAULT_PREFILL_TOKENS, Scheduler
from lynx_exit.engine.speculative import SpeculativeThinking, check_same_tokenizer
from lynx_exit.engine.store_backend import StoreBackend
from lynx_exit.engine.types import ExitPolicy, ForcedAnswer, RequestResult, Step
from lynx_exit.models import LoadedModel
from lynx_exit.models.profile import ThinkingStart
from lynx_exit.tasks.grading import extract_boxed


class Engine:
    """Continuous-batching decode engine over one `Backend`. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        lm: LoadedModel,
        max_batch_size: int = 16,
        backend: Backend | None = None,
        kv_cache_gb: float | None = None,
        prefill_tokens_per_step: int = DEFAULT_PREFILL_TOKENS,
        compile: bool | str = "auto",
        assistant: LoadedModel | None = None,
        assistant_backend: Backend | None = None,
        config: EngineConfig | None = None,
        overlap: bool | None = None,
    ) -> None:
        self.config = config or EngineConfig(
            max_batch_size=max_batch_size,
            kv_cache_gb=kv_cache_gb,
            prefill_tokens_per_step=prefill_tokens_per_step,
            compile=compile,
            overlap=overlap,
        )
        self.lm = lm
        self.eos_ids = lm.eos_token_ids
        self.compiled = compiles_on(self.config.compile, lm.device)
        self.backend: Backend = backend or StoreBackend(
            lm, kv_cache_gb=self.config.kv_cache_gb, compile=self.compiled
        )
        self.scheduler = Scheduler(
            self.backend,
            int(lm.model.config.hidden_size),
            lm.device,
            self.config.max_batch_size,
            self.config.prefill_tokens_per_step,
        )
        self.runner = Runner(self.backend, self.scheduler, lm.vocab_size, lm.device, self.eos_ids)
        self.forks = Forks(self.backend, lm.tokenizer, self.eos_ids)
        self.post = Postprocessor(self.backend, self.scheduler, self.forks, self.eos_ids, lm.context_length)
        self.assistant_backend: Backend | None = None
        self.plugin = EnginePlugin()
        if assistant is not None:
            check_same_tokenizer(lm, assistant)
            self.assistant_backend = assistant_backend or StoreBackend(
                assistant, kv_cache_gb=self.config.kv_cache_gb, compile=self.compiled
            )
            self.plugin = SpeculativeThinking(
                lm, self.backend, self.assistant_backend, self.runner, self.post
            )
        self.post.plugin = self.plugin
        self.scheduler.on_free.append(self.plugin.free)
        self.scheduler.on_compact.append(self.plugin.compact)
        self._next_id = 0
        self._exit_cues: dict[str, list[int]] = {}
        overlap = self.config.overlap
        overlap_on = lm.device.type == "cuda" if overlap is None else overlap
        # the backend that launches steps ahead (None: every step is synchronous)
        self.ahead_backend = self.backend if overlap_on and isinstance(self.backend, AheadBackend) else None
        self._ahead: Ahead | None = None  # the decode launched by the last step (see `overlap`)
        self.launched_ahead = 0  # decode steps launched ahead, and how many of them held
        self.ahead_held = 0

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

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
        decision_points: Sequence[str] | None = None,
    ) -> int:
        """Queue a request; returns its id. It joins the batch at the next `step` with a free row.

        `seed` defaults to `config.seed`. A policy's `Step.features` (its own `feature_spec`
        layers) come at cue steps; `feature_layers` asks for them at every thinking step. A policy
        whose feature space does not match this model is refused here, with both sides named. `thinking` says
        how this prompt starts thinking when its chat template was given other switches than the profile's
        (`LoadedModel.thinking_with`); by default the profile's. `assist`: Speculative Thinking for this
        request (the engine needs an assistant model). `decision_points`: the kinds of decision point found
        (`Step.point`); by default the policy's, else the model profile's."""
        config = config or GenerationConfig()
        assist_state = self.plugin.state(assist)
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
            raise ValueError(
                f"the prompt is {len(prompt)} tokens but model {self.lm.model_id!r} has a context of "
                f"{context} positions: shorten the prompt"
            )
        layers = request_layers(self.lm, policy, feature_layers)
        generator = None
        if not config.greedy:
            generator = torch.Generator(device=self.lm.device)
            generator.manual_seed(int(seed))
        if policy is not None:
            policy.reset()
        profile = self.lm.profile
        thinking = thinking or profile.thinking
        points = decision_points or getattr(policy, "decision_points", None) or profile.decision_points
        detector = detector_for(profile, points, thinking, config.cue_words, config.cue_regex)
        params = SamplingParams(
            temperature=0.0 if config.greedy else config.temperature,
            top_p=config.top_p,
            top_k=config.top_k if config.top_k < vocab else 0,
        )  # top-k over the whole vocabulary is off
        request = Request(
            request_id=self._next_id,
            prompt_ids=prompt,
            config=config,
            params=params,
            generator=generator,
            policy=policy,
            asks_trials=policy is not None and getattr(policy, "asks_trials", True),
            layers=layers,
            every_step=bool(feature_layers),
            detok=IncrementalDetokenizer(self.lm.tokenizer),
            detector=detector,
            exit_cue_ids=self.exit_cue_ids(config.exit_cue),
            hold=hold,
            phase="think" if thinking != "off" else "answer",
            reasoning_tokens=0 if thinking == "off" else None,
            assist=assist_state,
        )
        self.scheduler.check_fits_alone(request)
        self.scheduler.add(request)
        self._next_id += 1
        return request.request_id

    def exit_cue_ids(self, cue: str) -> list[int]:
        """Token ids of an exit cue (a variant in the model family's format, or literal text), cached."""
        if cue not in self._exit_cues:
            self._exit_cues[cue] = self.lm.exit_cue_ids(cue)
        return self._exit_cues[cue]

    def abort(self, request_id: int) -> None:
        """End a request now; its row is free for the next step. A no-op once it has finished."""
        request = self.scheduler.get(request_id)
        if request.finish_reason is None:
            self.scheduler.abort(request)

    def release(self, request_id: int) -> None:
        """Free the cache a finished `hold=True` request kept."""
        request = self.scheduler.get(request_id)
        if request.finish_reason is None:
            raise ValueError(f"request {request_id} is still running; abort it instead")
        self.scheduler.free(request, force=True)

    def result(self, request_id: int, forget: bool = False) -> RequestResult:
        """The result of a finished request; `forget` drops the engine's record of it."""
        request = self.scheduler.get(request_id)
        if request.finish_reason is None:
            raise RuntimeError(f"request {request_id} has not finished yet")
        if forget:
            self.scheduler.free(request, force=True)
            del self.scheduler.requests[request_id]
        generated = len(request.kept_ids)
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
            reasoning_tokens=generated if request.reasoning_tokens is None else request.reasoning_tokens,
            error=describe_error(request.error) if request.error is not None else None,
            assist=self.plugin.report(request, generated),
            exit_point=request.exit_point,
            gave_up=request.gave_up,
        )

    def error(self, request_id: int) -> BaseException | None:
        """The exception that failed a request (finish_reason "error"), else None."""
        return self.scheduler.get(request_id).error

    _requests = property(lambda self: self.scheduler.requests)  # for tests that reach into a request's record

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.scheduler.outbox)

    def stream(self) -> Iterator[Step]:
        """Steps until every request added so far (and any added meanwhile) has finished."""
        while self.has_unfinished():
            yield from self.step()

    def warm_up(self) -> float:
        """Run one short decode at every batch bucket up to `max_batch_size` (1, 2, 4, ...), so that no
        request waits for a compile or a CUDA graph capture later; returns the seconds it took (0 when nothing
        is compiled). Call it on an idle engine: it adds requests of its own and forgets them."""
        if not self.compiled or self.has_unfinished():
            return 0.0
        start = time.perf_counter()
        config = GenerationConfig(max_new_tokens=3, min_new_tokens=3, temperature=0.0)
        prompt = [self.lm.pad_token_id] * 2  # any token: nothing is read back
        sizes = sorted(
            {min(1 << i, self.max_batch_size) for i in range(self.max_batch_size.bit_length() + 1)}
        )
        for size in sizes:
            ids = [self.add_request(prompt, config) for _ in range(size)]
            while self.has_unfinished():
                self.step()
            for request_id in ids:
                self.result(request_id, forget=True)
        return time.perf_counter() - start

    def forced_answers(
        self, items: Sequence[tuple[int, int]], exit_cue_ids: Sequence[int], max_answer_tokens: int
    ) -> list[ForcedAnswer]:
        """Batched forced exits (how-it-works §3): item i continues request `items[i][0]` from its first
        `items[i][1]` generated tokens with the exit cue and a greedy answer; requests are untouched."""
        prefix = [
            (request_id, len(self.scheduler.get(request_id).prompt_ids) + kept) for request_id, kept in items
        ]
        return self.forks.fork(prefix, list(exit_cue_ids), max_answer_tokens)

    # -- one step: schedule -> run -> sample -> postprocess ----------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Step]:
        """Admit waiting requests, run one forward pass for all running ones, sample once. A fault is charged
        to the requests that can have caused it (see `runner`); they end with finish_reason "error" and the
        others go on exactly as if they had never been there."""
        steps = self.scheduler.take_outbox()
        batch = self._run(self._schedule())
        if batch.parts:
            logits = batch.logits()
            rows = batch.rows
            self.runner.ban_tokens(logits, rows, self.plugin.pending if self.assistant_backend else None)
            sampled, alive, logits = self.runner.sample(logits, rows)
            features, ahead = self._launch_ahead(batch, alive, sampled)
            token_ids = (
                self.runner.read_samples(sampled, logits, alive) if alive else []
            )  # the step's one host sync
            by_request = dict(zip([r.request_id for r in alive], token_ids, strict=True))
            steps += self._postprocess(batch, by_request, features)
            if ahead is not None and self.ahead_backend is not None:
                ahead.fed = [by_request[r] for r in ahead.request_ids]
                self._ahead = overlap.settle(ahead, self.scheduler.get, self.ahead_backend)
                self.ahead_held += self._ahead is not None
        self.scheduler.after_step()
        return steps + self.scheduler.take_outbox()

    def _launch_ahead(
        self, batch: Batch, alive: list[Request], sampled: torch.Tensor
    ) -> tuple[dict[int, torch.Tensor] | None, Ahead | None]:
        """Launch the next decode with the ids just sampled, before the host reads them, when every request
        holding a row samples a token it will feed (see `overlap`). Returns the hidden states of this step's
        fed rows (read before the launch replaces them) and the launch."""
        backend = self.ahead_backend
        hooked = self.plugin.hooked
        if backend is None or not alive or self.scheduler.held or (hooked and self.plugin.serves(alive)):
            return None, None
        if len(alive) != len(batch.rows) or any(r.restoring or not r.in_cache for r in alive):
            return None, None
        if len(alive) != sum(1 for r in self.scheduler.running_requests() if r.in_cache):
            return None, None  # a request reading its prompt holds a row too
        features = None
        wanted = [r for r in batch.fed if r.layers and r.phase == "think"]
        if wanted:
            states = self.backend.hidden_states([r.request_id for r in wanted])
            features = {r.request_id: states[i] for i, r in enumerate(wanted)}
        ahead = overlap.launch(backend, alive, sampled, self.scheduler.layers)
        self.launched_ahead += ahead is not None
        return features, ahead

    def _schedule(self) -> list[Request]:
        """The running requests that feed a token this step; admits waiting ones (they read their prompts)."""
        if self.plugin.hooked:
            self.plugin.before_step(self.scheduler.running_requests())
        fed = [r for r in self.scheduler.running_requests() if r.feed >= 0 and not r.restoring]
        self.scheduler.admit()
        return fed

    def _run(self, fed: list[Request]) -> Batch:
        """The step's passes: decode the fed rows, the plug-in's pass, the next chunk of each prompt being
        read."""
        batch = Batch()
        ahead, self._ahead = self._ahead, None
        usable = ahead is not None and bool(fed) and ahead.layers == self.scheduler.layers
        decoded = ahead.logits_for(fed) if usable and ahead is not None else None
        if ahead is not None:
            assert self.ahead_backend is not None  # only it launches
            # the rows or their taps changed since the launch: all of it is given up; else the rows that
            # ended since (an abort) give back what it wrote
            keep = None if decoded is None else {r.request_id for r in fed}
            overlap.rollback(ahead, self.scheduler.get, self.ahead_backend, keep)
        if fed:
            decoded = self.runner.decode(fed) if decoded is None else decoded
            batch.fed = [r for r in fed if r.finish_reason is None and r.in_cache]
            if batch.fed:
                batch.parts.append(decoded)
        if self.plugin.hooked:
            self.plugin.extra_pass(batch, self.scheduler.running_requests())
        for group, logits in self.runner.read_prompts():
            for request in (r for r in group if r.restoring and r.read == len(r.to_read)):
                request.restoring = (
                    False  # a preempted request read back what it held: it decodes its feed next
                )
            done = [
                i
                for i, r in enumerate(group)
                if not r.restoring and r.feed < 0 and r.read == len(r.prompt_ids)
            ]
            if done:  # a prompt read to its end samples its first token now
                batch.parts.append(logits if len(done) == len(group) else logits[done])
                batch.admitted += [group[i] for i in done]
        return batch

    def _postprocess(
        self, batch: Batch, by_request: dict[int, int], features: dict[int, torch.Tensor] | None
    ) -> list[Step]:
        steps: list[Step] = []
        now = time.perf_counter()
        for request in batch.admitted + batch.resumed:  # they sampled without a token fed
            if request.request_id not in by_request:
                continue
            if request in batch.admitted:
                request.started, request.index = now, -1  # `next` makes the first token index 0
            try:
                steps += self.post.next(request, by_request[request.request_id])
                self.plugin.after_sample(request, by_request[request.request_id])
            except Exception as exc:
                self.scheduler.fail(request, exc)
        fed = [r for r in batch.fed if r.finish_reason is None and r.request_id in by_request]
        tokens = [by_request[r.request_id] for r in fed]
        if features is None:
            return steps + self.post.advance(fed, tokens)
        return steps + self.post.advance(fed, tokens, [features.get(r.request_id) for r in fed])
