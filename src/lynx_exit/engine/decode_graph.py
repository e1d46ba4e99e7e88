"""The decode step as one captured graph: `--compile`.

A decode step of the `KVStore` backend reads one token for each of the slots 0..n-1. Here that step
is traced whole (embedding, every block, the KV writes, the final norm, the head and the
hidden-state taps) and compiled with `torch.compile`, once: the batch size and the attended width are symbolic
from the first call (`maybe_mark_dynamic` on the inputs and on the store's slots and columns), so no later
batch or context compiles again. Dynamo still gives a batch of one a graph of its own (it specialises sizes 0
and 1): two compiles for any trace (issue 35; `test_kv_store.py` counts them over batches 1-64 and
widths 64-8,192). What keeps the width out of every guard: the store's views are `narrow`ed to it (a slice's
size would be min(width, capacity)), the store keeps a column past the widest row (a width equal to the
capacity would be a case of its own), the CPU attention sums its softmax in float64 (Inductor splits a float32
sum of over 4,096 terms, and guards on it), and the CPU branch never reads the width. The layers a probe of
the model reads by default are tapped always (`taps`), whatever the requests ask: the layers asked are picked
from the step's output, so they never change the graph (a layer asked beyond them grows the taps, once).

On a GPU the step is recorded as CUDA graphs (`mode="reduce-overhead"`), one per shape, so shapes
are padded to buckets (`pad`): the batch up to a power of two (1, 2, 4, 8, ...), the attended width
up to a power of two from 64 to 512, then to a multiple of an eighth of its octave (`width_bucket`). A new
bucket records a CUDA graph of the one compiled graph (milliseconds), never a new compile.
On a CPU Inductor's fused kernels run the step at its exact shape: padding would only add work.

What makes the step capturable:
- the inputs (token ids and positions) in one buffer per batch bucket, filled by one copy from pinned memory;
- the plan (write positions, the mask from per-row positions) is built inside the graph from them;
- padding rows write at column 0 of free slots, which hold nothing anyone reads;
- the hidden states leave the graph as one `[bucket, layers x hidden]` float32 tensor, copied (the layers
  asked) before a later replay can overwrite it;
- the store's tensors are marked as static addresses, so a CUDA graph may write them in place.

Guards: dynamo checks a few hundred guards before each call (about 0.1-0.25 ms on this CPU, a third
of the reference model's compiled step). Everything they protect is in a key kept here: the batch
bucket, the width's power of two, which store and which allocation of its tensors. A key's first call runs
every guard (and compiles, if it must); later calls run only the guards that tell compiled entries apart
(`skip_guard_eval_unsafe`). Each model gets its own copy of the step's code (dynamo keeps compiled entries on
the code object), so no two models ever share an entry; engines on one model share its compiled steps."""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch

from lynx_exit.engine.kv_store import MIN_CAPACITY, PLAN_KWARG, KVStore, Plan, cache_kwarg
from lynx_exit.models import HiddenStateCapture, tappable_layers

MAX_BUCKET = 512  # larger decode batches run eagerly


def bucket(n: int) -> int:
    """The batch bucket of n rows: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def width_bucket(longest: int, capacity: int) -> int:
    """Key columns a padded step attends: the next power of two over `longest` (at least 64) up to 512, then
    the next multiple of an eighth of the power of two below it (1,025 -> 1,152; 8,193 -> 9,216: at most 1/8
    of the columns wasted, eight CUDA graphs per octave); at most `capacity`."""
    if longest <= 512:
        return min(capacity, max(MIN_CAPACITY, bucket(longest)))
    step = (1 << (longest.bit_length() - 1)) // 8
    return min(capacity, -(-longest // step) * step)


try:  # skipping the guards that do not tell compiled entries apart, set and reset around a call: what
    # `torch.compiler.set_stance(skip_guard_eval_unsafe=True)` does (it sets `eval_frame._stance`), without
    # its context manager's 6 us
    from torch._dynamo import eval_frame as _eval_frame
    from torch._dynamo.eval_frame import DynamoStance

    _SKIP_GUARDS: Any = DynamoStance(skip_guard_eval_unsafe=True)
    _STANCE = isinstance(getattr(_eval_frame, "_stance", None), DynamoStance)
except ImportError:  # another torch: the public context manager
    _STANCE = False
_STEP = "_lynx_decode_step"  # on the model: its compiled step and the keys it has run


class _ModelStep:
    """What one model's compiled decode steps share: the compiled function (made from a copy of
    `DecodeGraph._step`'s code), the keys it has run and its taps."""

    def __init__(self, model: Any, mode: str | None, layers: Sequence[int]) -> None:
        code = DecodeGraph._step.__code__.replace()
        step = types.FunctionType(code, DecodeGraph._step.__globals__, "decode_step")
        self.model = model
        self.compiled = torch.compile(step, dynamic=None, fullgraph=True, mode=mode)
        self.seen: set[tuple[Any, ...]] = set()
        self.taps = HiddenStateCapture(model, sorted(set(layers)))

    def tap(self, layers: Sequence[int]) -> None:
        """Tap `layers` too: new taps are a new graph (once; the taps only grow, in place, so every reader of
        them sees the new ones)."""
        if not set(layers) <= set(self.taps.layers):
            self.taps.extend(sorted(set(layers) - set(self.taps.layers)))
            self.seen.clear()


def _model_step(model: Any, mode: str | None, layers: Sequence[int]) -> _ModelStep:
    """The model's shared compiled step, made once per model, tapping `layers` (the layers a probe of the
    model reads by default): layers asked beyond them are tapped from then on."""
    if _STEP not in model.__dict__:
        model.__dict__[_STEP] = _ModelStep(model, mode, layers)
    return model.__dict__[_STEP]


class DecodeGraph:
    """Compiled decode steps of one model over one store (shapes padded to buckets when `pad`)."""

    def __init__(
        self,
        model: Any,
        store: KVStore,
        device: torch.device,
        pad_id: int,
        pad: bool | None = None,
        taps: Sequence[int] | None = None,
    ) -> None:
        self.model, self.store, self.device, self.pad_id = model, store, device, pad_id
        self._cache_kwarg = cache_kwarg(model)
        self.mode = "reduce-overhead" if device.type == "cuda" else None
        self.pad = device.type == "cuda" if pad is None else pad  # shapes padded to buckets (CUDA graphs)
        store.static_addresses = device.type == "cuda"
        self._select: tuple[Any, torch.Tensor] | None = None  # (taps and layers asked, their columns)
        self.layers: tuple[int, ...] = ()  # the layers asked: their states leave `run`
        self._inputs: dict[int, torch.Tensor] = {}  # bucket -> [2, bucket, 1] long: token ids, positions
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        self._columns = torch.arange(0, device=device)
        self._column_views: dict[int, torch.Tensor] = {}  # width -> self._columns[:width]
        self._inputs_host: dict[int, tuple[torch.Tensor, Any]] = {}  # CPU: size -> (buffer, its numpy view)
        self.steps = 0  # decode steps run as a compiled graph
        self.shapes: set[tuple[int, int]] = set()  # (batch, width) run
        # Entries: a batch of one and every other batch (and, past a context's last column, a few more).
        limit = 64
        dynamo = torch._dynamo.config
        dynamo.cache_size_limit = max(dynamo.cache_size_limit, limit)
        dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, limit)
        if self.mode == "reduce-overhead":  # one CUDA graph per bucket is the design, not a warning's cause
            import torch._inductor.config as inductor

            inductor.triton.cudagraph_dynamic_shape_warn_limit = None
        self.shared = _model_step(model, self.mode, tappable_layers(model) if taps is None else taps)
        self._compiled, self._seen = self.shared.compiled, self.shared.seen

    def _step(self, inputs: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, positions = inputs[0], inputs[1]  # [b, 1] each
        rows = torch.arange(ids.shape[0], device=ids.device)
        width = columns.shape[0]
        torch._check(width >= 1)
        torch._check(width <= self.store.capacity_of(0))
        mask = (columns[None, None, :] <= positions[:, :, None])[:, None]  # [b, 1, 1, width]
        plan = Plan(0, rows, rows, positions[:, 0], rows, torch.zeros_like(rows), width, mask, positions, {})
        # transformers before 5.2x hands the cache layers no keywords: they read the plan from the store
        self.store.plan = plan
        out = self.model(
            input_ids=ids,
            attention_mask=self._no_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: self.store, PLAN_KWARG: plan},
        )
        self.store.plan = None
        return out.logits[:, -1, :], self.shared.taps.features()

    @property
    def taps(self) -> HiddenStateCapture:
        return self.shared.taps

    def select(self, layers: Sequence[int]) -> None:
        """The layers whose hidden states `run` returns (the taps grow to hold them, once)."""
        self.layers = tuple(layers)
        self.shared.tap(self.layers)
        self._select = None

    def pick(self, features: torch.Tensor) -> torch.Tensor:
        """The columns of the layers asked, from the rows of a step's features (on demand: most steps read
        none)."""
        tapped = self.taps.layers
        if self.layers == tapped:
            return features
        key = (tapped, self.layers)
        if self._select is None or self._select[0] != key:
            hidden = int(self.model.config.hidden_size)
            starts = [tapped.index(layer) * hidden for layer in self.layers]
            index = torch.cat([torch.arange(s, s + hidden) for s in starts]).to(self.device)
            self._select = (key, index)
        return features.index_select(1, self._select[1])

    def fits(self, n: int) -> bool:
        return n <= MAX_BUCKET

    def _host_inputs(self, size: int) -> tuple[torch.Tensor, Any]:
        """The CPU step's input buffer of `size` rows ([2, size, 1]: token ids, positions) and a numpy view of
        it ([2, size]) to write them through (a host write costs a tenth of making a tensor)."""
        held = self._inputs_host.get(size)
        if held is None:
            buffer = torch.full((2, size, 1), self.pad_id, dtype=torch.long)
            buffer[1].zero_()
            held = self._inputs_host[size] = (buffer, buffer.numpy()[:, :, 0])
        return held

    def _columns_of(self, width: int) -> torch.Tensor:
        """Key column indices 0..width-1 (the view carries the step's width), kept: widths recur."""
        if self._columns.shape[0] < width:
            self._columns = torch.arange(max(width, self.store.capacity), device=self.device)
            self._column_views.clear()
        columns = self._column_views[width] = self._columns[:width]
        return columns

    def rows(self, n: int) -> int:
        """Batch rows a step of n requests runs (the slots the store must hold)."""
        return bucket(n) if self.pad else n

    def run(
        self, token_ids: Sequence[int] | torch.Tensor, lengths: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slot i (i < n) reads token_ids[i] at position lengths[i]: (logits [n, vocab], features of every
        tapped layer [n, F] or None when no layer is asked: `pick` selects). The token ids may be a tensor on
        the device (sampled by the step before, not yet read).

        The store must already hold `rows(n)` slots and room for every row's new token."""
        n = len(lengths)
        size = self.rows(n)
        longest = max(lengths) + 1
        # never the whole capacity: a width equal to it would be a graph of its own (the store keeps a column
        # past the widest row for this)
        width = width_bucket(longest, self.store.capacity - 1) if self.pad else longest
        on_device = isinstance(token_ids, torch.Tensor)
        if self.device.type == "cpu":  # one buffer a batch size, written in place: the step reads it at once
            inputs, host_view = self._host_inputs(size)
            if not on_device:
                host_view[0, :n] = token_ids
            host_view[1, :n] = lengths
            if n < size:  # padding rows read the pad token at position 0
                host_view[0, n:], host_view[1, n:] = self.pad_id, 0
        else:  # from pinned memory, so the copy does not wait for the device (the allocator keeps the block)
            pad = [self.pad_id] * (size - n)
            ids = [self.pad_id] * size if on_device else [*token_ids, *pad]
            host = torch.tensor([ids, [*lengths, *[0] * (size - n)]]).view(2, size, 1)  # one host op
            buffer = self._inputs.get(size)
            if buffer is None:
                buffer = self._inputs[size] = torch.empty((2, size, 1), dtype=torch.long, device=self.device)
            inputs = buffer
            inputs.copy_(host.pin_memory() if torch.cuda.is_available() else host, non_blocking=True)
        if isinstance(token_ids, torch.Tensor):
            inputs[0, :n, 0].copy_(token_ids)
        columns = self._column_views.get(width)
        if columns is None:
            columns = self._columns_of(width)
        # a width's first call in its power of two runs every guard (the graph does not specialise on it)
        key = (size, bucket(width), self.store.serial, self.store.generation)
        if key in self._seen and _STANCE:
            prior, _eval_frame._stance = _eval_frame._stance, _SKIP_GUARDS
            try:
                logits, features = self._compiled(self, inputs, columns)
            finally:
                _eval_frame._stance = prior
        elif key in self._seen:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                logits, features = self._compiled(self, inputs, columns)
        else:
            torch._dynamo.maybe_mark_dynamic(inputs, 1)
            torch._dynamo.maybe_mark_dynamic(columns, 0)
            logits, features = self._compiled(self, inputs, columns)
            self._seen.add(key)
        self.steps += 1
        self.shapes.add((size, width))
        replayed = self.mode == "reduce-overhead"  # a replay writes its outputs in place: keep copies
        if n < size:  # padding rows
            logits, features = logits[:n], features[:n]
        logits = logits.clone() if replayed else logits
        if not self.layers:
            return logits, None
        return (
            logits,
            features.clone() if replayed else features,
        )  # every tapped layer: `pick` takes those asked
