"""`StoreBackend`: the engine's backend on a `KVStore` written in place (see `kv_store`).

Every pass is one plan over slots: a decode reads one token for every slot in use (consecutive
slots from 0, so the keys are views), a prefill or `extend` reads a chunk for some requests, a
fork reads forced tokens and greedy ones in scratch slots above the live ones. Cache verbs are
index operations: `truncate` sets a length, `release` frees a slot, `compact` moves the few
requests above a hole down into it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lynx_exit.engine import attention  # noqa: F401 (registers the store's attention with transformers)
from lynx_exit.engine.backend import check_fork, greedy_continuations
from lynx_exit.engine.decode_graph import DecodeGraph
from lynx_exit.engine.kv_store import ATTENTION, PLAN_KWARG, KVStore, KVStoreFull, cache_kwarg, make_plan
from lynx_exit.models import HiddenStateCapture, LayerSelection, LoadedModel

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 32768  # when a config names no context length


def _context_limit(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


def _bytes_per_token(model: Any) -> int:
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    dtype_bytes = next(model.parameters()).element_size()
    return int(config.num_hidden_layers) * 2 * kv_heads * head_dim * dtype_bytes


def use_store_attention(model: Any) -> None:
    """Route the model's attention through the store's function (plain SDPA outside store passes)."""
    if model.config._attn_implementation == ATTENTION:
        return
    try:
        model.set_attn_implementation(ATTENTION)
    except (AttributeError, ValueError):
        model.config._attn_implementation = ATTENTION
    if model.config._attn_implementation != ATTENTION:
        raise ValueError(
            f"{type(model).__name__} does not take a registered attention function; "
            "the KV store needs one (transformers' AttentionInterface)"
        )


class StoreBackend:
    """A transformers causal LM over a `KVStore`: one slot per request, tokens written at their positions."""

    def __init__(
        self,
        lm: LoadedModel,
        kv_cache_gb: float | None = None,
        max_context: int | None = None,
        compile: bool = False,
    ) -> None:
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
        self.lm = lm
        self.model = lm.model
        self.device = lm.device
        self.pad_id = lm.pad_token_id
        use_store_attention(self.model)
        self._cache_kwarg = cache_kwarg(self.model)
        limit = _context_limit(self.model.config) if max_context is None else max_context
        budget = None if kv_cache_gb is None else int(kv_cache_gb * 2**30)
        self.store = KVStore(
            int(self.model.config.num_hidden_layers), self.device, limit, budget, _bytes_per_token(self.model)
        )
        # `compile`: each decode step runs as one compiled graph (see `decode_graph`)
        # tapping the layers a probe of this model reads by default (others asked are tapped once asked)
        self.graph = (
            DecodeGraph(self.model, self.store, self.device, self.pad_id, taps=lm.feature_spec().layers)
            if compile
            else None
        )
        self.rows: dict[int, int] = {}  # request id -> slot
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        self._capture: HiddenStateCapture | LayerSelection | None = None
        self._decoded: dict[int, torch.Tensor] = {}
        self._features: torch.Tensor | None = None  # the compiled step's hidden states, row = slot
        self.layers: tuple[int, ...] = ()

    # -- passes -------------------------------------------------------------------------------------
    def _run(
        self, slots: Sequence[int], chunks: Sequence[Sequence[int]], on_device: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One pass: slot i reads chunks[i] after what it holds; returns each row's last-position logits.
        `on_device`: the token ids [n] of a pass where every row reads one token, already on the device (the
        chunks then only count)."""
        lengths = self.store.lengths
        starts = [lengths[s] for s in slots]
        counts = [len(c) for c in chunks]
        self.store.reserve(max(slots) + 1, max(s + c for s, c in zip(starts, counts, strict=True)))
        plan = make_plan(slots, starts, counts, self.device)
        q = plan.positions.shape[1]
        if on_device is not None:
            input_ids = on_device.view(len(slots), 1)
        else:
            input_ids = torch.full((len(slots), q), self.pad_id, dtype=torch.long)
            for i, chunk in enumerate(chunks):
                if chunk:
                    input_ids[i, q - len(chunk) :] = torch.as_tensor(list(chunk), dtype=torch.long)
        with self.store.planned(plan):
            # A 4-D mask is taken as built (transformers builds none of its own); the store's
            # attention reads the plan's.
            out = self.model(
                input_ids=input_ids.to(self.device, non_blocking=True),
                attention_mask=self._no_mask,
                position_ids=plan.positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: self.store, PLAN_KWARG: plan},
            )
        for slot, start, count in zip(slots, starts, counts, strict=True):
            lengths[slot] = start + count
        return out.logits[:, -1, :]

    def _take_slots(self, count: int) -> list[int]:
        used = set(self.rows.values())
        free = [s for s in range(self.store.slots) if s not in used]
        return (free + list(range(self.store.slots, self.store.slots + count)))[:count]

    @torch.inference_mode()
    def prefill(self, request_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        if len(request_ids) != len(prompts) or not prompts:
            raise ValueError(
                f"prefill needs one prompt per request, got {len(request_ids)} ids and {len(prompts)} prompts"
            )
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs a non-empty prompt for every request")
        slots = self._take_slots(len(prompts))
        self.store.reserve(max(slots) + 1, 1)
        for slot in slots:
            self.store.lengths[slot] = 0
        logits = self._run(slots, prompts)  # on failure no slot is taken: the rows map is untouched
        self.rows.update(zip(request_ids, slots, strict=True))
        return logits

    @torch.inference_mode()
    def extend(self, request_ids: Sequence[int], chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append several known tokens to each request in one pass (chunked prefill, a forced cue, a
        hand-over); returns each request's logits after its last new token."""
        if len(request_ids) != len(chunks) or not chunks or any(len(c) == 0 for c in chunks):
            raise ValueError("extend needs one non-empty chunk per request")
        slots = [self.rows[r] for r in request_ids]
        if len(set(slots)) != len(slots):
            raise ValueError("extend got a request twice")
        return self._run(slots, chunks)

    @torch.inference_mode()
    def decode(self, request_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        slots = [self.rows[r] for r in request_ids]
        width = max(self.rows.values()) + 1  # every slot in use, so the batch is slots 0.. (views, no gather)
        graph = self.graph
        if graph is not None and len(slots) == width and slots == list(range(width)) and graph.fits(width):
            # the hot path: every slot reads a token, in slot order
            logits = self._captured_in_order([int(t) for t in token_ids])
            if logits is not None:
                return logits
        chunks: list[list[int]] = [[] for _ in range(width)]
        for slot, token in zip(slots, token_ids, strict=True):
            chunks[slot] = [int(token)]
        lengths = self.store.lengths
        longest = max(max(lengths[:width]), max(lengths[s] for s in slots) + 1)
        try:
            self.store.reserve(width, longest)
        except KVStoreFull as exc:  # name the requests that cannot grow: the others still fit and go on
            fits = min(self.store.capacity, self.store.max_tokens)
            over = tuple(r for r, s in zip(request_ids, slots, strict=True) if lengths[s] + 1 > fits)
            raise KVStoreFull(str(exc), over) from None
        logits = self._decode_slots(chunks)
        if slots != list(range(width)):
            logits = logits.index_select(0, torch.tensor(slots, device=self.device))
        return logits

    def _decode_slots(self, chunks: list[list[int]], on_device: torch.Tensor | None = None) -> torch.Tensor:
        """Slot i reads chunks[i] (or on_device[i]): the compiled step when it can run, else an eager pass."""
        logits = self._captured(chunks, on_device) if self.graph is not None else None
        if logits is None:
            logits = self._run(range(len(chunks)), chunks, on_device)
            self._decoded = self._capture.snapshot() if self._capture is not None else {}
            self._features = None
        return logits

    @torch.inference_mode()
    def decode_ahead(self, request_ids: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor | None:
        """`decode` with the token ids still on the device: a step launched before the host has read them (the
        engine's overlap). Only where every request holding a slot reads a token (else None, as when the
        cache cannot grow: the engine then decodes as usual). Returns logits [n, vocab] in request order."""
        slots = [self.rows[r] for r in request_ids]
        width = len(slots)
        if len(self.rows) != width or sorted(slots) != list(range(width)):
            return None
        lengths = self.store.lengths
        try:
            self.store.reserve(width, max(lengths[:width]) + 1)
        except KVStoreFull:
            return None
        by_slot = slots != list(range(width))
        if by_slot:  # the tokens in slot order
            order = sorted(range(width), key=slots.__getitem__)
            token_ids = token_ids.index_select(0, torch.tensor(order, device=self.device))
        logits = self._decode_slots([[0]] * width, token_ids)
        return logits.index_select(0, torch.tensor(slots, device=self.device)) if by_slot else logits

    def _captured_in_order(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor | None:
        """The compiled step where slot i reads token_ids[i] for every slot in use (None: it cannot run)."""
        assert self.graph is not None
        n = len(token_ids)
        lengths = self.store.lengths
        starts = lengths[:n]
        # padding rows need slots of their own, and the store a column past the widest row (a step whose
        # width were the whole capacity would compile a graph of its own); with no room, the step runs eagerly
        try:
            self.store.reserve(self.graph.rows(n), max(starts) + 2)
        except KVStoreFull:
            return None
        logits, self._features = self.graph.run(token_ids, starts)
        self._decoded = {}
        for slot in range(n):
            lengths[slot] += 1
        return logits

    def _captured(
        self, chunks: list[list[int]], on_device: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The compiled decode step, when every slot 0..n-1 reads a token (else None: the eager pass runs)."""
        assert self.graph is not None
        if not all(chunks) or not self.graph.fits(len(chunks)):
            return None
        return self._captured_in_order(on_device if on_device is not None else [c[0] for c in chunks])

    # -- hidden states ------------------------------------------------------------------------------
    def capture(self, layers: Sequence[int]) -> None:
        layers = tuple(layers)
        if layers == self.layers:
            return
        if self._capture is not None:
            self._capture.close()
        if self.graph is not None:  # the compiled step's taps serve the eager passes too
            self.graph.select(layers)
            self._capture = LayerSelection(self.graph.taps, layers) if layers else None
        else:
            self._capture = HiddenStateCapture(self.model, layers) if layers else None
        self.layers = layers

    def hidden_states(self, request_ids: Sequence[int]) -> torch.Tensor:
        index = torch.tensor([self.rows[r] for r in request_ids], device=self.device)  # decode row == slot
        if self._features is not None and self.graph is not None:
            return self.graph.pick(self._features.index_select(0, index))
        if self._capture is None or not self._decoded:
            raise RuntimeError("no hidden-state layers were captured by the last decode")
        return self._capture.features(index, self._decoded)

    # -- cache verbs ----------------------------------------------------------------------------------
    def length(self, request_id: int) -> int:
        return self.store.lengths[self.rows[request_id]]

    def truncate(self, request_id: int, length: int) -> None:
        """Roll a request back to its first `length` tokens (any number of them)."""
        held = self.length(request_id)
        if not 0 < length <= held:
            raise ValueError(f"request {request_id} holds {held} tokens, cannot truncate to {length}")
        self.store.lengths[self.rows[request_id]] = length

    def drop_last(self, request_id: int) -> None:
        self.truncate(request_id, self.length(request_id) - 1)

    def release(self, request_id: int) -> None:
        self.store.lengths[self.rows.pop(request_id)] = 0

    def token_budget(self) -> int | None:
        """Tokens of KV cache the memory budget holds (None: no budget)."""
        budget = self.store.budget_bytes
        return None if budget is None else budget // max(1, self.store.bytes_per_token)

    def fits(self, count: int, longest: int) -> bool:
        """Whether `count` requests of up to `longest` tokens each fit the budget together (the store gives
        back its free slots and columns to make that room when it must: see `KVStore.reserve`)."""
        budget = self.token_budget()
        return budget is None or count * longest <= budget

    @torch.inference_mode()
    def compact(self, drop_rows: bool) -> None:
        """Move requests above a free slot down into it, so decode batches stay slots 0..n-1 (under a budget
        the free slots above them are the room the next requests are admitted into: `KVStore.reserve` gives
        them back)."""
        used = sorted(self.rows.values())
        free = [s for s in range(len(used)) if s not in set(used)]
        by_slot = {slot: request_id for request_id, slot in self.rows.items()}
        for target, source in zip(free, reversed(used), strict=False):
            if source < target:
                break
            self.store.copy_slot(source, target, self.store.lengths[source])
            self.store.lengths[source] = 0
            self.rows[by_slot[source]] = target

    @torch.inference_mode()
    def fork(
        self,
        items: Sequence[tuple[int, int]],
        forced_ids: Sequence[int],
        max_new_tokens: int,
        stop_ids: set[int],
        done: Callable[[int, list[int]], bool],
    ) -> list[tuple[list[int], list[float], float]]:
        if not items:
            return []
        check_fork(items, forced_ids, self.length)
        n = len(items)
        base = max(self.rows.values()) + 1
        scratch = list(range(base, base + n))
        longest = max(keep for _, keep in items) + len(forced_ids) + max_new_tokens
        self.store.reserve(base + n, longest)
        try:
            for (request_id, keep), slot in zip(items, scratch, strict=True):
                self.store.copy_slot(self.rows[request_id], slot, keep)
            return self._greedy(scratch, list(forced_ids), max_new_tokens, stop_ids, done)
        finally:
            for slot in scratch:
                self.store.lengths[slot] = 0

    def _greedy(
        self,
        slots: list[int],
        forced_ids: list[int],
        max_new_tokens: int,
        stop_ids: set[int],
        done: Callable[[int, list[int]], bool],
    ) -> list[tuple[list[int], list[float], float]]:
        logits = self._run(slots, [forced_ids] * len(slots))
        # finished rows read on (nobody looks at them): the batch keeps its shape
        return greedy_continuations(
            logits,
            max_new_tokens,
            stop_ids,
            done,
            lambda _ids, host, _t: self._run(slots, [[i] for i in host]),
        )


__all__ = ["KVStoreFull", "StoreBackend", "use_store_attention"]
