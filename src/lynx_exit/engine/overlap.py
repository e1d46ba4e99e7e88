"""Overlap: the next decode step is launched before the host reads this step's tokens.

A step samples its tokens on the device; when every request holding a row goes on sampling, the next decode
is launched at once with those ids as its input (they never visit the host first), and only then are they read
and the step's host work done (detokenising, decision points, probe scores, the policy). On a GPU that work
runs while the device computes the next step, as vLLM's async scheduling and SGLang's overlap scheduler do; on
a CPU the device is the host, so nothing runs side by side, but the results are the same.

The step launched ahead is a guess that every request feeds what it sampled. After the host work, `settle`
checks it: a request that ended keeps nothing of it (a held cache is cut back), and one that feeds anything
else (an exit's cue, a forced token) makes the whole guess void: every row is cut back to what it held (the
store's `truncate`) and the next step decodes as if no guess had been made. Tokens, exits, cues and features
are the same as without overlap."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from lynx_exit.engine.backend import CacheFull
from lynx_exit.engine.request import Request


@runtime_checkable
class AheadBackend(Protocol):
    """What a backend adds to launch a step ahead: a decode fed from the device, and the cache verbs to undo
    it (`StoreBackend` has them)."""

    def decode_ahead(self, request_ids: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor | None: ...

    def length(self, request_id: int) -> int: ...

    def truncate(self, request_id: int, length: int) -> None: ...


@dataclass
class Ahead:
    """A decode launched before its inputs were read: rows `request_ids`, the ids fed (`fed`, host side once
    read), each row's cache length before the launch, and the logits it gave (request order)."""

    request_ids: list[int]
    lengths: list[int]
    logits: torch.Tensor
    layers: tuple[int, ...]
    fed: list[int] | None = None

    def logits_for(self, rows: Sequence[Request]) -> torch.Tensor | None:
        """The launched logits of `rows` in their order (None if a row was not launched)."""
        index = {request_id: i for i, request_id in enumerate(self.request_ids)}
        picks = [index.get(r.request_id) for r in rows]
        if any(i is None for i in picks):
            return None
        if picks == list(range(len(self.request_ids))):
            return self.logits
        return self.logits.index_select(0, torch.tensor(picks, dtype=torch.long, device=self.logits.device))


def launch(
    backend: AheadBackend, rows: Sequence[Request], sampled: torch.Tensor, layers: tuple[int, ...]
) -> Ahead | None:
    """Decode the ids just `sampled` (still on the device) for `rows`: the launch, or None when the backend
    cannot (a row's cache cannot grow, a slot reads nothing)."""
    ids = [r.request_id for r in rows]
    lengths = [backend.length(i) for i in ids]
    try:
        logits = backend.decode_ahead(ids, sampled)
    except CacheFull:
        return None
    return None if logits is None else Ahead(ids, lengths, logits, layers)


def settle(ahead: Ahead, get: Callable[[int], Request], backend: AheadBackend) -> Ahead | None:
    """After the host work of the step that launched `ahead`: the launch if it still holds, else None (every
    row cut back to what it held before the launch)."""
    assert ahead.fed is not None
    void = False
    for request_id, fed in zip(ahead.request_ids, ahead.fed, strict=True):
        request = get(request_id)
        if request.finish_reason is None and (
            not request.in_cache or request.restoring or request.feed != fed
        ):
            void = True
    keep: list[int] = []
    for i, request_id in enumerate(ahead.request_ids):
        request = get(request_id)
        if not request.in_cache:
            continue
        if void or request.finish_reason is not None:
            backend.truncate(request_id, min(backend.length(request_id), ahead.lengths[i]))
        else:
            keep.append(i)
    if void or not keep:
        return None
    if len(keep) < len(ahead.request_ids):
        index = torch.tensor(keep, dtype=torch.long, device=ahead.logits.device)
        return Ahead(
            [ahead.request_ids[i] for i in keep],
            [ahead.lengths[i] for i in keep],
            ahead.logits.index_select(0, index),
            ahead.layers,
            [ahead.fed[i] for i in keep],
        )
    return ahead


def rollback(
    ahead: Ahead, get: Callable[[int], Request], backend: AheadBackend, keep: set[int] | None = None
) -> None:
    """Give up a launch that was kept (for the rows not in `keep`): every such row still in the cache goes
    back to what it held before it (a request aborted since, but holding its cache, among them)."""
    for request_id, before in zip(ahead.request_ids, ahead.lengths, strict=True):
        if (keep is None or request_id not in keep) and get(request_id).in_cache:
            backend.truncate(request_id, before)
