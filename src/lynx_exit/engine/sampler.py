"""One batched sampler per decode step: temperature, top-k and top-p over `[batch, vocab]` at once.

Each row keeps its own `torch.Generator`, and its random draw is made from that generator
alone (an exponential race: `argmax(probs / Exp(1))` samples from `probs`, as vLLM's sampler
does), so a row's tokens never depend on which batch it ran in. Nothing here syncs with the
host: the caller reads the token ids once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


class TokenMask:
    """Sets `logits[rows[i], token_ids[i]]` to -inf in place (the banned tokens of all rows in one call). The
    index tensors of the last few ban patterns are kept: a step usually bans what the step before banned."""

    KEEP = 64  # patterns kept

    def __init__(self) -> None:
        # (device, dtype, rows, token ids) -> ((row index, token index), -inf in the dtype, numpy index)
        self._index: dict[tuple[Any, ...], tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, Any]] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int]) -> None:
        if not rows:
            return
        key = (logits.device, logits.dtype, tuple(rows), tuple(token_ids))
        held = self._index.get(key)
        if held is None:
            if len(self._index) >= self.KEEP:
                self._index.clear()
            both = torch.tensor([list(rows), list(token_ids)], device=logits.device)
            fill = torch.tensor(float("-inf"), device=logits.device, dtype=logits.dtype)
            host_index = (both[0].numpy(), both[1].numpy()) if _on_host(logits) else None
            held = self._index[key] = ((both[0], both[1]), fill, host_index)
        index, fill, host_index = held
        if host_index is not None and _on_host(logits):  # through numpy: a fifth of the dispatch cost
            logits.numpy()[host_index] = float("-inf")
        else:
            logits.index_put_(index, fill)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor | float:
    """A scalar when every row shares the value (the common case), else a [n, 1] tensor."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, device=like.device, dtype=like.dtype)[:, None]


def _filters(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1


def _filtered_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities [n, vocab] in token order after each row's top-k and top-p (rows that filter only)."""
    vocab = scores.shape[-1]
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # [n, vocab]
    ranks = torch.arange(vocab, device=scores.device)[None, :]
    remove = ranks >= torch.tensor(top_ks, device=scores.device)[:, None]
    probs = torch.softmax(sorted_scores, dim=-1)
    top_p = _column([p.top_p for p in params], probs)
    # Remove a token once the tokens before it already cover top_p; the first token always stays.
    remove |= (probs.cumsum(-1) - probs) >= top_p
    probs = torch.softmax(sorted_scores.masked_fill(remove, float("-inf")), dim=-1)
    return torch.empty_like(probs).scatter_(-1, order, probs)  # back to token order


def _on_host(logits: torch.Tensor) -> bool:
    """Whether numpy can read and write `logits` in place, as they are (a CPU tensor of float32 or 64)."""
    return (
        logits.dtype in (torch.float32, torch.float64)
        and logits.device.type == "cpu"
        and not logits.requires_grad
    )


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row ([n, vocab] -> [n]; the first of equals, as `torch.argmax`). On a
    CPU, through numpy: the same answer at a fraction of the dispatch cost (most of a small step's)."""
    if _on_host(logits):
        return torch.from_numpy(logits.numpy().argmax(-1))
    return torch.argmax(logits, dim=-1)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Next token ids [batch] from `logits` [batch, vocab]; row i uses `params[i]` and `generators[i]`.

    A row's token depends on its own logits, settings and generator only: rows that filter (top-k,
    top-p) are filtered apart from rows that do not, and every row races its noise in token order.
    """
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(
            f"{logits.shape[0]} rows of logits but {len(params)} params and {len(generators)} generators"
        )
    token_ids = greedy(logits)  # [batch]; greedy rows keep these
    sampled = [i for i, p in enumerate(params) if p.temperature != 0]
    if not sampled:
        return token_ids
    every_row = len(sampled) == logits.shape[0]
    rows = logits if every_row else logits[torch.tensor(sampled, device=logits.device)]
    row_params = [params[i] for i in sampled]
    scores = rows.float() / _column([p.temperature for p in row_params], rows.float())
    filtering = [n for n, p in enumerate(row_params) if _filters(p, scores.shape[-1])]
    if len(filtering) == len(row_params):
        probs = _filtered_probs(scores, row_params)  # [n, vocab]
    else:
        probs = torch.softmax(scores, dim=-1)
        if filtering:
            index = torch.tensor(filtering, device=scores.device)
            probs = probs.index_copy(
                0, index, _filtered_probs(scores.index_select(0, index), [row_params[n] for n in filtering])
            )
    noise = torch.empty_like(probs)
    for n, i in enumerate(sampled):  # one draw per row from its own generator: batch-independent
        noise[n].exponential_(generator=generators[i])
    picks = torch.argmax(probs / noise, dim=-1)  # [n]
    if every_row:
        return picks
    return token_ids.index_copy(0, torch.tensor(sampled, device=logits.device), picks)
