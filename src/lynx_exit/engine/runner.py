"""The runner: every backend call and the sampler, with one way to contain a fault.

A step shares one forward pass and one sampler call between strangers, so a fault is charged to the requests
that can have caused it: `contain` runs a batched call over all rows and, when it raises, over each half,
failing the rows that fail alone. Every per-row consequence (prefill chunks, the sampler, the batched reads
after it) goes through it; the running rows' own decode is the engine's, and only a backend that names the
requests it cannot hold (`CacheFull.request_ids`) fails rows there."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from lynx_exit.engine.backend import Backend, CacheFull
from lynx_exit.engine.request import Request
from lynx_exit.engine.sampler import GREEDY, SamplingParams, TokenMask, sample
from lynx_exit.engine.scheduler import Chunk, Scheduler

Item = TypeVar("Item")
Result = TypeVar("Result")
ReadFn = Callable[[list[int], list[list[int]]], torch.Tensor]


def contain(
    items: Sequence[Item], run: Callable[[list[Item]], Result], fail: Callable[[Item, Exception], None]
) -> list[tuple[list[Item], Result]]:
    """`run` over all items; if it raises, over each half (and so on), `fail`ing each item that raises alone.
    Returns the groups that ran and their results, in order. `run` must keep nothing of a call that raised."""
    if not items:
        return []
    group = list(items)
    try:
        return [(group, run(group))]
    except Exception as exc:
        if len(group) == 1:
            fail(group[0], exc)
            return []
        half = len(group) // 2
        return contain(group[:half], run, fail) + contain(group[half:], run, fail)


class Runner:
    """Backend passes and sampling for the engine's rows."""

    def __init__(
        self, backend: Backend, scheduler: Scheduler, vocab_size: int, device: torch.device, eos_ids: set[int]
    ) -> None:
        self.backend, self.scheduler = backend, scheduler
        self.vocab_size, self.device, self.eos_ids = vocab_size, device, eos_ids
        self.mask_tokens = TokenMask()
        self._eos = sorted(eos_ids)

    def decode(self, fed: list[Request]) -> torch.Tensor:
        """One decode pass. When the cache cannot grow for some requests (named by the backend), the youngest
        running request is preempted (recomputed later) and the rest decode; with nobody left to preempt, the
        named requests fail alone. Returns the logits of the fed requests still in the cache, in order."""
        try:
            return self.backend.decode([r.request_id for r in fed], [r.feed for r in fed])
        except CacheFull as exc:
            over = set(exc.request_ids)
            if not over:
                raise
            if len(fed) < 2 or self.scheduler.preempt() is None:
                for request in fed:
                    if request.request_id in over:
                        self.scheduler.fail(request, exc)
            # the freed slots are given back (and compacted) before the others decode
            self.scheduler.after_step()
            rest = [r for r in fed if r.finish_reason is None and r.in_cache]
            if not rest:
                return torch.empty((0, self.vocab_size), device=self.device)
            return self.decode(rest)

    def read_prompts(self) -> list[tuple[list[Request], torch.Tensor]]:
        """Read the next chunk of every prompt still being read; returns the groups read and their logits."""
        first, more = self.scheduler.prompt_chunks()
        return self.read_chunks(first, self.backend.prefill) + self.read_chunks(more, self.backend.extend)

    def read_chunks(
        self, items: list[Chunk], read: ReadFn, prompt: bool = True
    ) -> list[tuple[list[Request], torch.Tensor]]:
        """Read one chunk per request (of its prompt, or for another model); a request that fails alone
        fails."""

        def run(group: list[Chunk]) -> torch.Tensor:
            return read([r.request_id for r, _ in group], [chunk for _, chunk in group])

        def fail(item: Chunk, exc: Exception) -> None:
            request = item[0]
            if prompt:
                request.in_cache = request.read > 0  # a first chunk that failed left nothing in the cache
            self.scheduler.fail(request, exc)

        out = []
        for group, logits in contain(items, run, fail):
            if prompt:
                for request, chunk in group:
                    request.read += len(chunk)
            out.append(([r for r, _ in group], logits))
        return out

    # -- sampling ------------------------------------------------------------------------------------
    def ban_tokens(
        self, logits: torch.Tensor, batch: list[Request], pending: Callable[[Request], int] | None
    ) -> None:
        """min_new_tokens and policies' banned tokens (NoWait-style logit bias, how-it-works §9), one call.
        `pending`: tokens a row has written that are not kept yet (a look-ahead; None: none)."""
        rows: list[int] = []
        token_ids: list[int] = []
        for row, request in enumerate(batch):
            phase = request.phase
            if phase == "think":
                policy = request.policy
                policy_bans = policy.banned_token_ids if policy is not None else ()
            elif phase == "answer":
                policy_bans = ()
            else:  # greedy: an exit cue, a forced answer
                continue
            least = request.config.min_new_tokens
            no_eos = least > 0 and (
                len(request.kept_ids) + (pending(request) if pending else 0) + (request.feed >= 0) < least
            )
            if policy_bans:
                banned = sorted(set(policy_bans) | (self.eos_ids if no_eos else set()))
            elif no_eos:
                banned = self._eos
            else:
                continue
            rows += [row] * len(banned)
            token_ids += banned
        self.mask_tokens(logits, rows, token_ids)

    def sample(
        self, logits: torch.Tensor, batch: list[Request]
    ) -> tuple[torch.Tensor, list[Request], torch.Tensor]:
        """Sampled ids [n] for the rows of `batch` still alive, those rows and their logits; a failing row
        fails alone (the filters run before any row draws from its generator, so a rerun of the others is
        exact)."""

        if all(not r.sampling or r.params.temperature == 0 for r in batch):  # greedy only: nothing can fail
            n = len(batch)
            return sample(logits, [GREEDY] * n, [None] * n), batch, logits

        def params(rows: list[Request]) -> tuple[list[SamplingParams], list[torch.Generator | None]]:
            return (
                [r.params if r.sampling else GREEDY for r in rows],
                [r.generator if r.sampling else None for r in rows],
            )

        def run(rows: list[int]) -> torch.Tensor:
            part = (
                logits
                if len(rows) == len(batch)
                else logits.index_select(0, torch.tensor(rows, device=logits.device))
            )
            return sample(part, *params([batch[i] for i in rows]))

        groups = contain(range(len(batch)), run, lambda i, exc: self.scheduler.fail(batch[i], exc))
        if len(groups) == 1 and len(groups[0][0]) == len(batch):
            return groups[0][1], batch, logits
        rows = [i for group, _ in groups for i in group]
        if not rows:
            return logits.new_zeros(0, dtype=torch.long), [], logits[:0]
        picks = torch.cat([picked for _, picked in groups])
        return (
            picks,
            [batch[i] for i in rows],
            logits.index_select(0, torch.tensor(rows, device=logits.device)),
        )

    def read_samples(self, sampled: torch.Tensor, logits: torch.Tensor, batch: list[Request]) -> list[int]:
        """The sampled ids on the host; with them, in the same sync, DeepConf token confidences for the
        thinking rows whose policy asks (the negative mean log-probability of their top-k tokens)."""
        wanted = [
            (i, r.policy.confidence_top_k)
            for i, r in enumerate(batch)
            if r.phase == "think" and r.policy is not None and r.policy.confidence_top_k > 0
        ]
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
