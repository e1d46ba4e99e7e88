"""A KV store written in place, behind transformers' own extension points.

`KVStore` is a `transformers.Cache`: per layer one preallocated tensor of keys and one of values,
`[slots, kv_heads, capacity, head_dim]`, one slot per request. Each request's tokens sit at columns
0..length-1 of its slot (no left padding), so a new token is written at its own position and nothing
is ever concatenated. Before each forward pass the backend gives the store a `Plan`: which slots
the batch rows are, where each row's new tokens go, and the boolean mask over the key columns. The
attention function registered as `lynx_store` (`attention.py`) reads that mask and calls SDPA on views of the
store (GQA without repeating the keys); a batch of consecutive slots needs no copy at all.

Only what a request holds is masked in; a slot is grown by doubling its capacity (amortised: a copy
per doubling, not per token) up to the context limit and the memory budget; under a budget, a reserve that
would pass it first gives back the slots and columns nobody holds (only then: a reallocation re-records a CUDA
graph)."""

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
from transformers.cache_utils import Cache, CacheLayerMixin

from lynx_exit.engine.backend import CacheFull

ATTENTION = "lynx_store"
MIN_CAPACITY = 64
MIN_SLOTS = 2
_SERIALS = itertools.count()


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


PLAN_KWARG = (
    "lynx_plan"  # the plan rides the model's keyword arguments down to each attention call and cache update
)
_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("lynx_store_plan", default=None)


class _StoreLayer(CacheLayerMixin):
    """One decoder layer's view of the store (transformers calls `update` on it)."""

    is_compileable = False

    def __init__(self, store: KVStore, index: int) -> None:
        super().__init__()
        self.store, self.index = store, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        forwarded = (
            kwargs.get("kwargs") or kwargs.get("cache_kwargs") or {}
        )  # the layer's keywords (5.x names)
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

    def __init__(
        self,
        num_layers: int,
        device: torch.device,
        max_tokens: int,
        budget_bytes: int | None = None,
        bytes_per_token: int = 0,
    ) -> None:
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
        self.static_addresses = (
            False  # a CUDA graph writes the tensors in place: their addresses must not move
        )
        self.serial = next(_SERIALS)  # which store, and which of its allocations (compiled steps key on both)
        self.generation = 0

    def _allocated(self, tensor: torch.Tensor) -> torch.Tensor:
        self.generation += 1
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(tensor, 2)
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
            raise KVStoreFull(
                f"a request needs {tokens} tokens of KV cache, more than the context limit {self.max_tokens}"
            )
        capacity = self.capacity
        if tokens > capacity:
            capacity = min(max(MIN_CAPACITY, 2 ** math.ceil(math.log2(tokens))), self.max_tokens)
        # at least two slots: a compiled step would specialise on a store of one (see `decode_graph`)
        asked, slots = slots, max(slots, self.slots, MIN_SLOTS)
        if capacity == self.capacity and slots == self.slots:
            return
        if self.budget_bytes is not None and slots * capacity * self.bytes_per_token > self.budget_bytes:
            # Under a budget the store gives back what nobody holds: empty slots above the ones asked for
            slots = max(asked, max((i + 1 for i, n in enumerate(self.lengths) if n), default=0))
            fit = self.budget_bytes // max(1, slots * self.bytes_per_token)
            # under a budget the columns may shrink to what the slots hold, to make room for more slots
            capacity = max(tokens, max(self.lengths, default=0), min(capacity, fit))
            if slots * capacity * self.bytes_per_token > self.budget_bytes:
                raise KVStoreFull(
                    f"the KV cache budget of {self.budget_bytes / 2**30:.3g} GiB holds "
                    f"{self.budget_bytes // max(1, self.bytes_per_token)} tokens; {slots} requests of "
                    f"{capacity} tokens "
                    "do not fit (raise --kv-cache-gb or lower the batch size)"
                )
        self._reallocate(slots, capacity)

    def _reallocate(self, slots: int, capacity: int) -> None:
        """`slots` × `capacity` tensors holding what the first slots hold (up to the smaller capacity)."""
        keep, columns = min(slots, self.slots), min(capacity, self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                if old is None:
                    continue
                new = old.new_zeros(slots, old.shape[1], capacity, old.shape[3])
                new[:keep, :, :columns] = old[:keep, :, :columns]
                store[i] = self._allocated(new)
        del self.lengths[slots:]  # in place: callers hold this list across a reserve
        self.lengths.extend([0] * (slots - len(self.lengths)))
        self.capacity = capacity

    def capacity_of(self, layer: int) -> Any:
        """Columns of a layer's tensors (symbolic inside a compiled step; `capacity` is the host's int)."""
        tensor = self.keys[layer]
        return self.capacity if tensor is None else tensor.shape[2]

    def allocated_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for store in (self.keys, self.values) for t in store if t is not None
        )

    # -- one pass -------------------------------------------------------------------------------------
    def write(
        self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, plan: Plan | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's new keys and values (`[n, kv_heads, q, head_dim]`) in place; return what to
        attend."""
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
                new = (
                    states[:, :, 0]
                    if plan.src_rows.shape[0] == states.shape[0]
                    else states[plan.src_rows, :, 0]
                )
            else:
                new = states.transpose(1, 2)[plan.src_rows, plan.src_cols]
            tensor[plan.write_rows, :, plan.write_cols] = new.to(tensor.dtype)
            # `narrow`, not a slice: its size is exactly the width, symbolic or not (a slice's is min(width,
            # capacity), which a compiled step cannot decide for a width it does not specialise on)
            columns = tensor.narrow(2, 0, plan.width)
            if plan.first is not None:
                out.append(columns.narrow(0, plan.first, plan.rows.shape[0]))
            else:
                out.append(columns.index_select(0, plan.rows))
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


def make_plan(
    rows: Sequence[int], starts: Sequence[int], counts: Sequence[int], device: torch.device
) -> Plan:
    """The plan of one pass: batch row i is slot rows[i], holding starts[i] tokens, and reads counts[i] new
    ones, right-aligned in the pass (so the last query position is every row's last token)."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    slots = torch.tensor(list(rows), dtype=torch.long)
    if max(counts) <= 1:  # a decode step: the hot path, built from host lists in a few small tensors
        ends = [s + c for s, c in zip(starts, counts, strict=True)]
        width = max(1, max(ends))
        written = [i for i, c in enumerate(counts) if c]
        clamped = torch.tensor([[max(e - 1, 0)] for e in ends], dtype=torch.long)  # the query's own position
        host = move(
            torch.tensor(
                [[rows[i] for i in written], [starts[i] for i in written], written], dtype=torch.long
            )
        )
        # Every row attending its whole width (equal lengths) needs no mask at all: SDPA's fastest path.
        mask = (
            None
            if min(ends) == width
            else move((torch.arange(width)[None, None, :] <= clamped[:, :, None])[:, None])
        )
        return Plan(
            _first(rows),
            move(slots),
            host[0],
            host[1],
            host[2],
            torch.zeros_like(host[2]),
            width,
            mask,
            move(clamped),
            {},
        )
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
    return Plan(
        _first(rows),
        move(slots),
        move(slots[src_rows]),
        move(positions[valid]),
        move(src_rows),
        move(src_cols),
        width,
        move(mask[:, None]),
        move(clamped),
        {},
    )
