"""The attention function the KV store registers with transformers (`lynx_store`): SDPA over the store's views
with the plan's mask, GQA without repeating the keys, two BLAS matmuls for a CPU decode.

Which branch runs depends on the device (`branch_device`); `device_branches("cuda")` makes a CPU take a GPU's
branches, so the CPU suite executes the paths that only a GPU takes otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from lynx_exit.engine.kv_store import _ACTIVE, ATTENTION, PLAN_KWARG, Plan

# A CPU decode reads attention with two matmuls instead of SDPA: SDPA's CPU kernel is slower for a query this
# short at every width measured (8 rows, 3 KV heads: 39 vs 43-76 us at 40 columns, 373 vs 427-446 us at
# 1,000; 32 rows at 4,096: 12 vs 19 ms per layer). Not a width threshold: a compiled step's width is symbolic
# (no branch may read it).
CPU_MATMUL_DECODE = True


# Whose branches the attention takes: the query's device ("auto"), or the device named here. A CPU test that
# sets "cuda" runs the kernels and layouts a GPU would (grouped SDPA with a mask, its strided output), so CI
# executes the path that only a GPU takes otherwise. A plain global, not a context variable: a compiled step
# reads it (and guards on it).
_BRANCHES = "auto"


@contextmanager
def device_branches(device_type: str) -> Iterator[None]:
    """Take the attention branches of `device_type` ("cpu", "cuda") whatever device the tensors are on (a test
    hook for one thread: the setting is process-wide while the block runs)."""
    global _BRANCHES
    if device_type not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device_branches takes 'auto', 'cpu' or 'cuda', got {device_type!r}")
    before, _BRANCHES = _BRANCHES, device_type
    try:
        yield
    finally:
        _BRANCHES = before


def branch_device(tensor: torch.Tensor) -> str:
    """The device type whose branches a pass over `tensor` takes (see `device_branches`)."""
    return tensor.device.type if _BRANCHES == "auto" else _BRANCHES


def _window_mask(plan: Plan, window: int) -> torch.Tensor:
    if window not in plan.windows:
        columns = torch.arange(plan.width, device=plan.positions.device)
        inside = plan.positions[:, None, :, None] - columns < window
        plan.windows[window] = inside if plan.mask is None else plan.mask & inside
    return plan.windows[window]


def _matmul_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def _baddbmm_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """`_matmul_attention` for a compiled CPU step: Inductor lowers a one-row `bmm` on a CPU to its own loops
    (slower than BLAS at a thousand columns and more), a `baddbmm` to BLAS."""
    batch, heads, rows, head_dim = query.shape
    width = key.shape[2]
    nothing = query.new_zeros((1, 1, 1))  # beta=0: only its shape matters
    scores = torch.baddbmm(
        nothing,
        query.reshape(batch * heads, rows, head_dim),
        key.reshape(batch * heads, width, head_dim).transpose(1, 2),
        beta=0,
        alpha=scale,
    )
    scores = scores.view(batch, heads, rows, width)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # softmax with its sum in float64: Inductor's CPU code sums a float32 row of over 4,096 columns in chunks,
    # a choice it guards on, so a width across 4,096 would compile the step again
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    total = weights.sum(dim=-1, keepdim=True, dtype=torch.float64).to(weights.dtype)
    probs = (weights / total).view(batch * heads, rows, width)
    out = torch.baddbmm(nothing, probs, value.reshape(batch * heads, width, value.shape[-1]), beta=0)
    return out.view(batch, heads, rows, value.shape[-1])


def store_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA over the store's views with the plan's mask; outside a store pass, transformers' own SDPA."""
    plan = kwargs.pop(PLAN_KWARG, None) or _ACTIVE.get()  # the keyword reaches compiled layers as an input
    if plan is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"the KV store's attention has no {name} (this model needs it): "
                "no backend of lynx-exit runs this model"
            )
    mask = plan.mask if sliding_window is None else _window_mask(plan, int(sliding_window))
    batch, heads, q_len, head_dim = query.shape
    # From the module where it says (a plain int: under torch.compile the shapes are symbolic)
    groups = int(getattr(module, "num_key_value_groups", 0)) or heads // key.shape[1]
    on_cpu = branch_device(query) == "cpu"
    matmul = on_cpu and CPU_MATMUL_DECODE
    if q_len == 1 and (groups > 1 or matmul):
        # Decode: a group of query heads reads its KV head as one short query (no repeated keys).
        grouped = query.reshape(batch, key.shape[1], groups, head_dim)
        if matmul:  # two BLAS matmuls read the keys at memory speed (see CPU_MATMUL_DECODE)
            scale = head_dim**-0.5 if scaling is None else float(scaling)
            attend = _baddbmm_attention if torch.compiler.is_compiling() else _matmul_attention
            out = attend(grouped, key, value, mask, scale)
        else:
            out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
        # `reshape`, not `view`: CUDA's SDPA returns this grouped query with a mask in a strided layout
        return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, store_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # used only outside store passes
