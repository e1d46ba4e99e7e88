"""Forks of running requests: forced answers (how-it-works §3: the prefix, the exit cue, a greedy answer) and
the trial decodes exit methods ask for, from the request's own cache, leaving the request untouched."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from lynx_exit.engine.backend import Backend
from lynx_exit.engine.request import Request, brace_depth
from lynx_exit.engine.types import ForcedAnswer, Step, TrialKind
from lynx_exit.tasks.grading import extract_boxed


def trial_prefix(request: Request, drop_current: bool) -> int:
    """Tokens a trial from this step keeps: prompt and generated ones, less a cue token (how-it-works §3)."""
    return len(request.prompt_ids) + len(request.kept_ids) - (1 if drop_current else 0)


class Forks:
    """Batched greedy continuations from a prefix of requests' caches."""

    def __init__(self, backend: Backend, tokenizer: Any, eos_ids: set[int]) -> None:
        self.backend, self.tokenizer, self.eos_ids = backend, tokenizer, eos_ids

    def fork(
        self, items: Sequence[tuple[int, int]], exit_cue_ids: list[int], max_answer_tokens: int
    ) -> list[ForcedAnswer]:
        """Item i continues request `items[i][0]` from its first `items[i][1]` tokens (prompt included)."""
        tokenizer = self.tokenizer

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

    def callback(self, request: Request, drop_current: bool) -> Callable[[], ForcedAnswer]:
        """`Step.fork`: a forced answer from this step, on demand. A partial, not a closure: it is made for
        every thinking step of every row (hot path)."""
        keep = trial_prefix(request, drop_current)
        return functools.partial(
            self._fork_one, request.request_id, keep, request.exit_cue_ids, request.config.answer_max_tokens
        )

    def _fork_one(
        self, request_id: int, keep: int, exit_cue_ids: list[int], max_answer_tokens: int
    ) -> ForcedAnswer:
        return self.fork([(request_id, keep)], exit_cue_ids, max_answer_tokens)[0]

    def run_trials(self, reads: list[tuple[Request, Step, int]]) -> None:
        """The trial decodes the policies ask for at this step: one batched fork per kind (and exit cue)."""
        groups: dict[tuple[TrialKind, tuple[int, ...], int], list[tuple[Step, tuple[int, int]]]] = {}
        for request, step, _ in reads:
            if step.phase != "think" or request.policy is None:
                continue
            kind = request.policy.trial_at(step)
            if kind is None:
                continue
            keep = trial_prefix(request, drop_current=step.point == "cue")
            max_tokens = request.config.answer_max_tokens if kind == "answer" else 0
            key = (kind, tuple(request.exit_cue_ids), max_tokens)
            groups.setdefault(key, []).append((step, (request.request_id, keep)))
        for (_, forced, max_tokens), members in groups.items():
            trials = self.fork([item for _, item in members], list(forced), max_tokens)
            for (step, _), trial in zip(members, trials, strict=True):
                step.trial = trial
