"""The sampler's host paths: on a CPU, greedy picks and bans go through numpy (a fraction of torch's dispatch
cost in a small step); they must answer exactly what torch's ops answer."""

from __future__ import annotations

import pytest
import torch

from lynx_exit.engine.sampler import TokenMask, greedy


def _hard_rows(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(7)
    rows = torch.randn(9, 37).to(dtype)
    rows[1, [3, 20]] = rows[1].max() + 1  # a tie: the first wins
    rows[2, 5] = float("nan")  # NaN is the largest, as in torch.argmax
    rows[2, 30] = float("nan")
    rows[3] = float("-inf")  # every token banned
    rows[4, :] = 0.5  # all equal
    rows[5, -1] = float("inf")
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_greedy_picks_what_argmax_picks(dtype):
    rows = _hard_rows(dtype)
    for logits in (rows, rows[::2], rows.t().contiguous().t(), rows[:, None, :][:, -1, :]):
        assert greedy(logits).tolist() == torch.argmax(logits, dim=-1).tolist()
        assert greedy(logits).dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_token_mask_bans_what_index_put_bans(dtype):
    mask = TokenMask()
    for rows, tokens in (([0, 0, 2], [1, 36, 5]), ([1], [0]), ([0, 0, 2], [1, 36, 5])):  # a pattern again
        logits = _hard_rows(dtype)[:, None, :][:, -1, :]  # the engine's logits: a view of the last position
        expected = logits.clone()
        expected[torch.tensor(rows), torch.tensor(tokens)] = float("-inf")
        mask(logits, rows, tokens)
        assert torch.equal(logits.isnan(), expected.isnan())
        assert torch.equal(logits.nan_to_num(), expected.nan_to_num())
