"""A KV store written in place, behind transformers' own extension points.

`KVStore` is a `transformers.Cache`: per layer one preallocated tensor of keys and one of values,
`[slots, kv_heads, capacity, head_dim]`, one slot per request. Each request's tokens sit at columns
0..length-1 of its slot (no left padding), so a new token is written at its own position and nothing
is ever concatenated. Before each forward pass the backend gives the store a `Plan`: which slots
the batch rows are, where each row's new tokens go, and the boolean mask over the key columns. The
attention function registered here as `lynx_store` reads that mask and calls SDPA on views of the
store (GQA without repeating the keys); a batch of consecutive slots needs no copy at all.

Only what a request holds is masked in; a slot is grown by doubling its capacity (amortised: a copy
per doubling, not per token) up to the context limit and the memory budget.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from lynx_exit.engine.backend import CacheFull

ATTENTION = "lynx_store"
MIN_CAPACITY = 64
# Key columns from which a CPU decode reads attention with two matmuls instead of SDPA: from the first. SDPA's CPU
# kernel is slower for a query this short at every width measured (8 rows, 3 KV heads: 39 vs 43-76 us at 40 columns,
# 373 vs 427-446 us at 1,000; 32 rows at 4,096: 12 vs 19 ms per layer).
CPU_MATMUL_DECODE_FROM = 1


_SERIALS = itertools.count()

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


def cache_kwarg(model: Any) -> str:
    """The keyword a model's forward takes its cache by: transformers renamed `past_key_values` to `cache`
    in 5.2x (5.17-5.19, the versions vLLM pins, know only the old name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KVStoreFull(CacheFull):
    """The store cannot hold what a request needs within the context limit or the memory budget."""


@dataclass
class Plan:
    """One forward pass over the store: batch row i is slot `first + i` (a range) or `rows[i]` (gathered)."""

    first: int | None  # consecutive slots first..first+n-1: keys are read as views
    rows: torch.Tensor  # [n] slots of the batch rows
    write_rows: torch.Tensor  # [m] slot of each new token
    write_cols: torch.Tensor  # [m] its column
    src_rows: torch.Tensor  # [m] its batch row
    src_cols: torch.Tensor  # [m] its query position in the pass
    width: int  # key columns the pass attends over
    mask: torch.Tensor | None  # [n, 1, q, width] bool: True = attend (None: every row attends every column)
    positions: torch.Tensor  # [n, q] position of each query (clamped at 0 for padding)
    windows: dict[int, torch.Tensor]  # sliding-window masks, made on first use


PLAN_KWARG = "lynx_plan"  # the plan rides the model's keyword arguments down to each attention call and cache update
_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("lynx_store_plan", default=None)


def _window_mask(plan: Plan, window: int) -> torch.Tensor:
    if window not in plan.windows:
        columns = torch.arange(plan.width, device=plan.positions.device)
        inside = plan.positions[:, None, :, None] - columns < window
        plan.windows[window] = inside if plan.mask is None else plan.mask & inside
    return plan.windows[window]


def _matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def _baddbmm_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """`_matmul_attention` for a compiled CPU step: Inductor lowers a one-row `bmm` on a CPU to its own loops
    (slower than BLAS at a thousand columns and more), a `baddbmm` to BLAS."""
    batch, heads, rows, head_dim = query.shape
    width = key.shape[2]
    nothing = query.new_zeros((1, 1, 1))  # beta=0: only its shape matters
    scores = torch.baddbmm(nothing, query.reshape(batch * heads, rows, head_dim),
                           key.reshape(batch * heads, width, head_dim).transpose(1, 2), beta=0, alpha=scale)
    scores = scores.view(batch, heads, rows, width)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch * heads, rows, width)
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
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the KV store's attention has no {name} (this model needs it): "
                                      "no backend of lynx-exit runs this model")
    mask = plan.mask if sliding_window is None else _window_mask(plan, int(sliding_window))
    batch, heads, q_len, head_dim = query.shape
    # From the module where it says (a plain int: under torch.compile the shapes are symbolic)
    groups = int(getattr(module, "num_key_value_groups", 0)) or heads // key.shape[1]
    on_cpu = branch_device(query) == "cpu"
    if q_len == 1 and (groups > 1 or (on_cpu and plan.width >= CPU_MATMUL_DECODE_FROM)):
        # Decode: a group of query heads reads its KV head as one short query (no repeated keys).
        grouped = query.reshape(batch, key.shape[1], groups, head_dim)
        if on_cpu and plan.width >= CPU_MATMUL_DECODE_FROM:
            # On a CPU two BLAS matmuls read the keys at memory speed, where SDPA's CPU kernel for a query this
            # short is slower (see CPU_MATMUL_DECODE_FROM).
            scale = head_dim**-0.5 if scaling is None else float(scaling)
            attend = _baddbmm_attention if torch.compiler.is_compiling() else _matmul_attention
            out = attend(grouped, key, value, mask, scale)
        else:
            out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
        # `reshape`, not `view`: CUDA's SDPA returns this grouped query with a mask in a strided layout
        return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, store_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # used only outside store passes


class _StoreLayer(CacheLayerMixin):
    """One decoder layer's view of the store (transformers calls `update` on it)."""

    is_compileable = False

    def __init__(self, store: KVStore, index: int) -> None:
        super().__init__()
        self.store, self.index = store, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        forwarded = kwargs.get("kwargs") or kwargs.get("cache_kwargs") or {}  # the layer's keywords (5.x names)
        plan = forwarded.get(PLAN_KWARG) if isinstance(forwarded, dict) else None
        return self.store.write(self.index, key_states, value_states, plan)

    def get_seq_length(self) -> int:
        return max(self.store.lengths, default=0)

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.store.capacity


class KVStore(Cache):
    """Preallocated keys and values for `slots` requests of up to `capacity` tokens each.

    The store only knows slots and lengths; which request holds which slot is the backend's business.
    """

    def __init__(self, num_layers: int, device: torch.device, max_tokens: int, budget_bytes: int | None = None,
                 bytes_per_token: int = 0) -> None:
        super().__init__(layers=[_StoreLayer(self, i) for i in range(num_layers)])
        self.device = device
        self.max_tokens = max_tokens  # the context limit of one request
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token  # all layers, keys and values (estimate before allocation)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths: list[int] = []  # per slot, host side
        self.capacity = 0
        self.plan: Plan | None = None
        self.static_addresses = False  # a CUDA graph writes the tensors in place: their addresses must not move
        self.serial = next(_SERIALS)  # which store, and which of its allocations (compiled steps key on both)
        self.generation = 0

    def _allocated(self, tensor: torch.Tensor) -> torch.Tensor:
        self.generation += 1
        if self.static_addresses:
            torch._dynamo.mark_static_address(tensor, guard=False)  # a moved tensor re-records its CUDA graph
        return tensor

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return len(self.lengths)

    def reserve(self, slots: int, tokens: int) -> None:
        """Make room for `slots` slots of `tokens` tokens each (grows by doubling; keeps what is written)."""
        if tokens > self.max_tokens:
            raise KVStoreFull(f"a request needs {tokens} tokens of KV cache, more than the context limit {self.max_tokens}")
        capacity = self.capacity
        if tokens > capacity:
            capacity = min(max(MIN_CAPACITY, 2 ** math.ceil(math.log2(tokens))), self.max_tokens)
        slots = max(slots, self.slots)
        if capacity == self.capacity and slots == self.slots:
            return
        if self.budget_bytes is not None and slots * capacity * self.bytes_per_token > self.budget_bytes:
            fit = self.budget_bytes // max(1, slots * self.bytes_per_token)
            capacity = max(tokens, self.capacity, min(capacity, fit))
            if slots * capacity * self.bytes_per_token > self.budget_bytes:
                raise KVStoreFull(
                    f"the KV cache budget of {self.budget_bytes / 2**30:.3g} GiB holds "
                    f"{self.budget_bytes // max(1, self.bytes_per_token)} tokens; {slots} requests of {capacity} tokens "
                    "do not fit (raise --kv-cache-gb or lower the batch size)")
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                if old is None:
                    continue
                new = old.new_zeros(slots, old.shape[1], capacity, old.shape[3])
                new[: old.shape[0], :, : self.capacity] = old
                store[i] = self._allocated(new)
        self.lengths += [0] * (slots - self.slots)
        self.capacity = capacity

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store if t is not None)

    # -- one pass -------------------------------------------------------------------------------------
    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor,
              plan: Plan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's new keys and values (`[n, kv_heads, q, head_dim]`) in place; return what to attend."""
        plan = plan or self.plan
        if plan is None:
            raise RuntimeError("the KV store was called outside a planned pass")
        out = []
        for store, states in ((self.keys, key_states), (self.values, value_states)):
            tensor = store[layer]
            if tensor is None:  # first pass: shapes and dtype come from the model itself
                tensor = states.new_zeros(self.slots, states.shape[1], self.capacity, states.shape[3])
                tensor = store[layer] = self._allocated(tensor)
            if states.shape[2] == 1:  # decode: one token per row
                new = states[:, :, 0] if plan.src_rows.shape[0] == states.shape[0] else states[plan.src_rows, :, 0]
            else:
                new = states.transpose(1, 2)[plan.src_rows, plan.src_cols]
            tensor[plan.write_rows, :, plan.write_cols] = new.to(tensor.dtype)
            if plan.first is not None:
                out.append(tensor[plan.first : plan.first + plan.rows.shape[0], :, : plan.width])
            else:
                out.append(tensor[:, :, : plan.width].index_select(0, plan.rows))
        return out[0], out[1]

    @contextmanager
    def planned(self, plan: Plan) -> Iterator[None]:
        self.plan = plan
        token = _ACTIVE.set(plan)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            self.plan = None

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` tokens of slot `source` into slot `target`."""
        for store in (self.keys, self.values):
            for tensor in store:
                if tensor is not None:
                    tensor[target, :, :length] = tensor[source, :, :length]
        self.lengths[target] = length


def _first(rows: Sequence[int]) -> int | None:
    return rows[0] if list(rows) == list(range(rows[0], rows[0] + len(rows))) else None


def make_plan(rows: Sequence[int], starts: Sequence[int], counts: Sequence[int], device: torch.device) -> Plan:
    """The plan of one pass: batch row i is slot rows[i], holding starts[i] tokens, and reads counts[i] new ones,
    right-aligned in the pass (so the last query position is every row's last token)."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    slots = torch.tensor(list(rows), dtype=torch.long)
    if max(counts) <= 1:  # a decode step: the hot path, built from host lists in a few small tensors
        ends = [s + c for s, c in zip(starts, counts, strict=True)]
        width = max(1, max(ends))
        written = [i for i, c in enumerate(counts) if c]
        clamped = torch.tensor([[max(e - 1, 0)] for e in ends], dtype=torch.long)  # the query's own position
        host = move(torch.tensor([[rows[i] for i in written], [starts[i] for i in written], written], dtype=torch.long))
        # Every row attending its whole width (equal lengths) needs no mask at all: SDPA's fastest path.
        mask = None if min(ends) == width else move((torch.arange(width)[None, None, :] <= clamped[:, :, None])[:, None])
        return Plan(_first(rows), move(slots), host[0], host[1], host[2], torch.zeros_like(host[2]), width, mask,
                    move(clamped), {})
    q = max(counts)
    start = torch.tensor(list(starts), dtype=torch.long)
    count = torch.tensor(list(counts), dtype=torch.long)
    offsets = torch.arange(q, dtype=torch.long)[None, :] - (q - count)[:, None]  # [n, q]: < 0 is padding
    positions = start[:, None] + offsets
    valid = offsets >= 0
    src_rows, src_cols = valid.nonzero(as_tuple=True)
    width = max(1, int((start + count).max()))
    clamped = positions.clamp(min=0)
    mask = torch.arange(width)[None, None, :] <= clamped[:, :, None]  # [n, q, width]
    return Plan(_first(rows), move(slots), move(slots[src_rows]), move(positions[valid]), move(src_rows), move(src_cols),
                width, move(mask[:, None]), move(clamped), {})
