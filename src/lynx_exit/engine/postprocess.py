"""The per-token state machine: what a sampled token does to its request.

`Postprocessor.advance` reads the tokens just fed (text, cues, features, batched scores and trials, the
policy's decision, an exit) and queues each request's next input or finishes it. It works on any rows, one
included: a plug-in that commits tokens later (a Speculative Thinking look-ahead) calls it row by row with the
features it kept.

Exits follow how-it-works §6: at an exit the cue token is dropped from the request (forgotten by the cache),
the exit cue is fed through the same cache, and the answer is decoded greedily until its `\\boxed{...}`
closes."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from lynx_exit.engine.backend import Backend
from lynx_exit.engine.forks import Forks
from lynx_exit.engine.plugin import EnginePlugin
from lynx_exit.engine.request import Request, brace_depth
from lynx_exit.engine.runner import contain
from lynx_exit.engine.scheduler import Scheduler
from lynx_exit.engine.types import Decision, Step

Read = tuple[Request, Step, int]  # a request, the step of the token it read, the token sampled after it


class Postprocessor:
    def __init__(
        self,
        backend: Backend,
        scheduler: Scheduler,
        forks: Forks,
        eos_ids: set[int],
        context_length: int | None,
    ) -> None:
        self.backend, self.scheduler, self.forks = backend, scheduler, forks
        self.eos_ids, self.context_length = eos_ids, context_length
        self.plugin = EnginePlugin()

    def advance(
        self,
        rows: list[Request],
        candidates: Sequence[int],
        features: Sequence[torch.Tensor | None] | None = None,
        hooks: bool = True,
    ) -> list[Step]:
        """Read the tokens `rows` fed and queue what each samples next. `features`: the hidden states of each
        row's fed token when they were read earlier (else read from the backend); `hooks`: tell the
        plug-in."""
        fail = self.scheduler.fail
        steps: list[Step] = []
        reads: list[Read] = []
        hooks = hooks and self.plugin.hooked
        features_due = trials = False  # whether a read step needs hidden states; may ask a trial decode
        for row, (request, candidate) in enumerate(zip(rows, candidates, strict=True)):
            try:
                handled = self.plugin.intercept(request, candidate) if hooks else None
                if handled is not None:
                    steps += handled
                elif request.sampling:
                    step = self.read(request, candidate)
                    if features is not None:
                        self._own_features(request, step, features[row])
                    reads.append((request, step, candidate))
                    if step.phase == "think":
                        trials = trials or request.asks_trials
                        features_due = features_due or (
                            bool(request.layers) and (request.every_step or step.point is not None)
                        )
                else:
                    steps += self.forced(request, candidate)
            except Exception as exc:
                fail(request, exc)
        # Only the stages some row needs run (most steps of most rows are at no decision point): features
        # where a step is at a point (or every step is asked), scores of those, the trials a policy asks.
        stages = [self.attach_features] if features_due and features is None else []
        stages += [self.score] if features_due else []
        stages += [self.forks.run_trials] if trials else []
        for stage in stages:  # they only attach results to their steps: a rerun after a fault is harmless
            contain(
                [read for read in reads if read[0].finish_reason is None],
                stage,
                lambda read, exc: fail(read[0], exc),
            )
        for request, step, candidate in reads:
            if request.finish_reason is not None:  # failed in a batched read
                continue
            try:
                decision = (
                    request.policy.observe(step)
                    if step.phase == "think" and request.policy is not None
                    else None
                )
                exited = decision in (Decision.EXIT, Decision.GIVE_UP)
                lookahead = exited and getattr(request.policy, "exit_prefix", None) == "lookahead"
                if lookahead and candidate in self.eos_ids:
                    exited = False  # the token that would stay ends the sequence: nothing left to exit from
                if exited:
                    candidate = self.exit(
                        request,
                        step,
                        gave_up=decision is Decision.GIVE_UP,
                        keep=candidate if lookahead else None,
                    )
                forced = not exited and bool(request.forced)
                if forced:  # a queued sentence (a recap), token by token, instead of what was sampled
                    candidate = request.forced.popleft()
                after = self.next(request, candidate)
                if hooks and not exited and not forced and request.finish_reason is None:
                    self.plugin.after_commit(
                        request, step, candidate
                    )  # only where the model sampled what comes next
            except Exception as exc:
                fail(request, exc)
                continue
            steps.append(step)
            steps += after
        return steps

    @staticmethod
    def _own_features(request: Request, step: Step, features: torch.Tensor | None) -> None:
        if features is not None and step.phase == "think" and (request.every_step or step.point is not None):
            step.features = features if request.feature_columns is None else features[request.feature_columns]

    def read(self, request: Request, candidate: int) -> Step:
        token, index = request.feed, request.index
        request.kept_ids.append(token)
        delta = request.detok.push(token)
        lookahead = (
            "" if candidate in self.eos_ids else request.detok.peek(candidate)
        )  # reused by the next push
        request.text += delta
        thinking = request.detector.thinking
        cue = request.detector.step(delta, lookahead) if thinking else None
        point = request.detector.point if thinking else None
        if thinking and not request.detector.thinking:
            request.phase, request.reasoning_tokens = "answer", len(request.kept_ids)
        if cue is not None:
            request.cue_indices.append(index)
        step = Step(
            request_id=request.request_id,
            index=index,
            token_id=token,
            text=delta,
            phase="think" if thinking else "answer",
            cue=cue,
            point=point,
            confidence=request.feed_confidence,
        )
        if thinking and request.policy is not None:
            step.fork = self.forks.callback(request, drop_current=point == "cue")
        return step

    def attach_features(self, reads: list[Read]) -> None:
        """Hidden states of the steps that need them, read from the backend in one call."""
        wanted = [
            (r, s)
            for r, s, _ in reads
            if s.phase == "think" and r.layers and (r.every_step or s.point is not None)
        ]
        if not wanted:
            return
        states = self.backend.hidden_states([r.request_id for r, _ in wanted])  # [n, len(union) * hidden]
        for i, (request, step) in enumerate(wanted):
            step.features = (
                states[i] if request.feature_columns is None else states[i, request.feature_columns]
            )

    def score(self, reads: list[Read]) -> None:
        """Score the features of every decision point that has a scorer, one call per scorer."""
        groups: dict[int, list[Step]] = {}
        scorers = {}
        for request, step, _ in reads:
            scorer = request.policy.scorer if request.policy is not None else None
            if step.point is not None and step.features is not None and scorer is not None:
                groups.setdefault(id(scorer), []).append(step)
                scorers[id(scorer)] = scorer
        for key, group in groups.items():
            features = torch.stack([s.features for s in group])  # type: ignore[misc]
            points = [str(s.point) for s in group]  # every step here is at a decision point
            scores = scorers[key](features, points).tolist()
            for step, score in zip(group, scores, strict=True):
                step.score = float(score)

    def exit(self, request: Request, step: Step, gave_up: bool = False, keep: int | None = None) -> int:
        """Apply an exit decision (or a give-up) at `step`; returns the first token to feed: of the exit cue,
        or `keep` (the look-ahead exit prefix: the token sampled after the point stays, then the exit cue)."""
        step.exit, step.gave_up = True, gave_up
        request.exit_index, request.exit_point, request.gave_up = step.index, step.point, gave_up
        if step.point == "cue" and keep is None:  # how-it-works §3: the prefix ends before the cue token
            request.kept_ids.pop()
            self.backend.truncate(request.request_id, len(request.prompt_ids) + len(request.kept_ids))
            request.text = request.text[: len(request.text) - len(step.text)]
            request.cue_indices.pop()
        request.phase = "exit_cue"
        request.reasoning_tokens = len(request.kept_ids) + (keep is not None)
        self.plugin.on_exit(request)
        request.forced = deque(([] if keep is None else [keep]) + request.exit_cue_ids)
        return request.forced.popleft()

    def forced(self, request: Request, greedy_id: int) -> list[Step]:
        """A token of the exit cue or of the forced answer was read."""
        token = request.feed
        request.kept_ids.append(token)
        delta = request.detok.push(token)
        request.text += delta
        step = Step(
            request_id=request.request_id,
            index=request.index,
            token_id=token,
            text=delta,
            phase=request.phase,
        )
        if request.phase == "exit_cue":
            if request.forced:
                return [step, *self.next(request, request.forced.popleft())]
            request.phase = "forced_answer"
            return [step, *self.next(request, greedy_id)]
        request.answer_tokens += 1
        request.answer_depth = brace_depth(delta, request.answer_depth)
        if request.answer_depth == 0 or request.answer_tokens >= request.config.answer_max_tokens:
            step.finish_reason = "exit"
            self.scheduler.close(request, "exit")
            return [step]
        return [step, *self.next(request, greedy_id)]

    def next(self, request: Request, candidate: int) -> list[Step]:
        """Queue `candidate` as the request's next input, or finish it."""
        request.index += 1
        if candidate in self.eos_ids and request.phase != "exit_cue":
            request.kept_ids.append(candidate)
            return self.scheduler.finish(request, candidate, "eos")
        context = self.context_length
        if (request.sampling and len(request.kept_ids) >= request.config.max_new_tokens) or (
            context is not None and len(request.prompt_ids) + len(request.kept_ids) >= context
        ):
            return self.scheduler.finish(request, -1, "length")  # the budget, or the model's last position
        request.feed = candidate
        request.feed_confidence, request.candidate_confidence = request.candidate_confidence, None
        return []
