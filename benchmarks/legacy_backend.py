"""`LegacyBackend`: the engine's first backend, one left-padded `DynamicCache` with a row per request.

Not used by any front end. It is kept as the baseline the KV store is measured against
(`benchmarks/context_scaling.py`) and tested against (`tests/test_kv_store.py`: identical tokens).
Its decode concatenates every layer's keys and values (a copy of the whole cache per step); its
`extend` is one decode per token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from lynx_exit.engine.backend import check_fork, greedy_continuations
from lynx_exit.engine.kv_store import cache_kwarg
from lynx_exit.models import HiddenStateCapture, LoadedModel


class LegacyBackend:
    """A transformers causal LM with one left-padded `DynamicCache`, one batch row per request.

    Rows of finished requests are reused by new ones; `compact` removes holes and leading
    columns nobody attends to. Every cache edit of lynx-exit lives in this class.
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.model = lm.model
        self.device = lm.device
        self.pad_id = lm.pad_token_id
        self._cache_kwarg = cache_kwarg(lm.model)
        self.cache = DynamicCache()
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # [rows, columns]
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)  # [rows] attended tokens
        self.rows: dict[int, int] = {}  # request id -> batch row
        self._starts: dict[int, int] = {}  # batch row -> first column it attends (host copy)
        self._dropped: dict[int, int] = {}  # batch row -> columns masked out after its start
        self._capture: HiddenStateCapture | None = None
        self._decoded: dict[int, torch.Tensor] = {}  # the last decode's hidden states by layer
        self.layers: tuple[int, ...] = ()

    # -- model calls ---------------------------------------------------------------------------
    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        kwargs = {self._cache_kwarg: cache}
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1, :]  # [batch, vocab]

    @torch.inference_mode()
    def prefill(self, request_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        if len(request_ids) != len(prompts) or not prompts:
            raise ValueError(
                f"prefill needs one prompt per request, got {len(request_ids)} ids and {len(prompts)} prompts"
            )
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[i, width - len(prompt) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        fresh = DynamicCache()
        logits = self._forward(input_ids, mask, positions, fresh)
        self._insert(list(request_ids), fresh, mask, [width - len(p) for p in prompts])
        return logits

    @torch.inference_mode()
    def decode(self, request_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        num_rows = self.mask.shape[0]
        rows = [self.rows[r] for r in request_ids]
        feed = torch.full((num_rows,), self.pad_id, dtype=torch.long)
        column = torch.zeros((num_rows,), dtype=torch.long)
        row_index = torch.tensor(rows, dtype=torch.long)
        feed[row_index] = torch.tensor(list(token_ids), dtype=torch.long)
        column[row_index] = 1
        feed, column = feed.to(self.device, non_blocking=True), column.to(self.device, non_blocking=True)
        positions = self.lengths[:, None]  # [rows, 1]: the new token follows the attended ones
        self.mask = torch.cat([self.mask, column[:, None]], dim=1)
        self.lengths = self.lengths + column
        logits = self._forward(feed[:, None], self.mask, positions, self.cache)
        # Keep this pass's states: a prefill or a fork later in the same engine step runs the hooks again.
        self._decoded = self._capture.snapshot() if self._capture is not None else {}
        if rows != list(range(num_rows)):  # only the requests asked for, in their order
            logits = logits.index_select(0, row_index.to(self.device))
        return logits

    def hidden_states(self, request_ids: Sequence[int]) -> torch.Tensor:
        if self._capture is None or not self._decoded:
            raise RuntimeError("no hidden-state layers were captured by the last decode")
        # Rows move only in `compact`, which the engine calls after the step's reads.
        index = torch.tensor([self.rows[r] for r in request_ids], device=self.device)
        return self._capture.features(index, self._decoded)

    def capture(self, layers: Sequence[int]) -> None:
        layers = tuple(layers)
        if layers == self.layers:
            return
        if self._capture is not None:
            self._capture.close()
        self._capture = HiddenStateCapture(self.model, layers) if layers else None
        self.layers = layers

    @torch.inference_mode()
    def truncate(self, request_id: int, length: int) -> None:
        row = self.rows[request_id]
        held = int(self.lengths[row])
        if not 0 < length <= held:
            raise ValueError(f"request {request_id} holds {held} tokens, cannot truncate to {length}")
        attended = self.mask[row].nonzero().flatten()
        self.mask[row, attended[length:]] = 0
        self.lengths[row] = length
        self._dropped[row] = self._dropped.get(row, 0) + held - length

    def drop_last(self, request_id: int) -> None:
        self.truncate(request_id, int(self.lengths[self.rows[request_id]]) - 1)

    @torch.inference_mode()
    def extend(self, request_ids: Sequence[int], chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """One decode per token (this backend has no multi-token pass over a live request)."""
        if len(request_ids) != len(chunks) or not chunks or any(len(c) == 0 for c in chunks):
            raise ValueError("extend needs one non-empty chunk per request")
        last: dict[int, torch.Tensor] = {}
        for t in range(max(len(c) for c in chunks)):
            live = [(r, c[t]) for r, c in zip(request_ids, chunks, strict=True) if t < len(c)]
            logits = self.decode([r for r, _ in live], [token for _, token in live])
            last.update({r: logits[i] for i, (r, _) in enumerate(live)})
        return torch.stack([last[r] for r in request_ids])

    @torch.inference_mode()
    def release(self, request_id: int) -> None:
        row = self.rows.pop(request_id)
        self.mask[row] = 0
        self.lengths[row] = 0
        self._starts.pop(row, None)
        self._dropped.pop(row, None)

    # -- cache verbs ---------------------------------------------------------------------------
    def _free_rows(self) -> list[int]:
        used = set(self.rows.values())
        return [row for row in range(self.mask.shape[0]) if row not in used]

    def _insert(
        self, request_ids: list[int], fresh: DynamicCache, fresh_mask: torch.Tensor, offsets: list[int]
    ) -> None:
        """Write a freshly prefilled batch into free rows (appending rows as needed), right-aligned."""
        if not self.rows and self.mask.shape[0] == 0:  # empty engine: adopt the fresh cache as is
            self.cache, self.mask = fresh, fresh_mask
            self.lengths = fresh_mask.sum(-1)
            for i, request_id in enumerate(request_ids):
                self.rows[request_id], self._starts[i] = i, offsets[i]
            return
        free = self._free_rows()
        missing = len(request_ids) - len(free)
        if missing > 0:
            self._append_rows(missing)
            free += list(range(self.mask.shape[0] - missing, self.mask.shape[0]))
        rows = free[: len(request_ids)]
        width, fresh_width = self.mask.shape[1], fresh_mask.shape[1]
        if fresh_width > width:
            self._widen(fresh_width - width)
            width = fresh_width
        index = torch.tensor(rows, device=self.device)
        for layer, new in zip(self._layers(self.cache), self._layers(fresh), strict=True):
            for name in ("keys", "values"):
                target = getattr(layer, name)
                target[index] = 0  # a reused row may hold anything (even NaN from a fully masked pass)
                target[index, :, width - fresh_width :, :] = getattr(new, name)
        rows_mask = torch.zeros((len(rows), width), dtype=self.mask.dtype, device=self.device)
        rows_mask[:, width - fresh_width :] = fresh_mask
        self.mask[index] = rows_mask
        self.lengths[index] = fresh_mask.sum(-1)
        for i, (request_id, row) in enumerate(zip(request_ids, rows, strict=True)):
            self.rows[request_id], self._starts[row] = row, width - fresh_width + offsets[i]
            self._dropped.pop(row, None)

    @staticmethod
    def _layers(cache: DynamicCache) -> list[Any]:
        return list(cache.layers)

    def _append_rows(self, count: int) -> None:
        for layer in self._layers(self.cache):
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                setattr(layer, name, torch.cat([tensor, tensor.new_zeros(count, *tensor.shape[1:])], dim=0))
        self.mask = torch.cat([self.mask, self.mask.new_zeros(count, self.mask.shape[1])], dim=0)
        self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(count)])

    def _widen(self, extra: int) -> None:
        """Add `extra` masked columns on the left of every row."""
        for layer in self._layers(self.cache):
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                setattr(
                    layer,
                    name,
                    torch.cat([tensor.new_zeros(*tensor.shape[:2], extra, tensor.shape[3]), tensor], dim=2),
                )
        self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], extra), self.mask], dim=1)
        self._starts = {row: start + extra for row, start in self._starts.items()}

    @torch.inference_mode()
    def compact(self, drop_rows: bool) -> None:
        """Drop leading columns no request attends to and, with `drop_rows`, rows no request uses."""
        used = sorted(self.rows.values())
        if drop_rows and len(used) < self.mask.shape[0]:
            index = torch.tensor(used, dtype=torch.long, device=self.device)
            for layer in self._layers(self.cache):
                for name in ("keys", "values"):
                    setattr(layer, name, getattr(layer, name).index_select(0, index))
            self.mask, self.lengths = self.mask.index_select(0, index), self.lengths.index_select(0, index)
            new_row = {old: new for new, old in enumerate(used)}
            self.rows = {request_id: new_row[row] for request_id, row in self.rows.items()}
            self._starts = {new_row[row]: start for row, start in self._starts.items() if row in new_row}
            self._dropped = {new_row[row]: n for row, n in self._dropped.items() if row in new_row}
        first = min(self._starts.values(), default=self.mask.shape[1])
        if first > 0:
            for layer in self._layers(self.cache):
                for name in ("keys", "values"):
                    setattr(layer, name, getattr(layer, name)[:, :, first:, :])
            self.mask = self.mask[:, first:]
            self._starts = {row: start - first for row, start in self._starts.items()}

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
        check_fork(items, forced_ids, lambda request_id: int(self.lengths[self.rows[request_id]]))
        rows = [self.rows[request_id] for request_id, _ in items]
        keeps = [keep for _, keep in items]
        # Columns past the last kept token of any item are masked for all: do not copy them.
        num_columns = max(
            self._starts[row] + keep + self._dropped.get(row, 0)
            for row, keep in zip(rows, keeps, strict=True)
        )
        num_columns = min(num_columns, self.mask.shape[1])
        index = torch.tensor(rows, device=self.device)
        fork = DynamicCache()
        for layer_idx, layer in enumerate(self._layers(self.cache)):
            keys, values = layer.keys[:, :, :num_columns], layer.values[:, :, :num_columns]
            fork.update(keys.index_select(0, index), values.index_select(0, index), layer_idx)
        kept = torch.tensor(keeps, device=self.device)  # [n]
        mask = self.mask[:, :num_columns].index_select(0, index)  # [n, columns]
        mask = mask * (mask.cumsum(-1) <= kept[:, None])  # the first `keep` attended tokens
        n, num_forced = len(items), len(forced_ids)
        cue = torch.tensor(list(forced_ids), device=self.device).repeat(n, 1)  # [n, forced]
        mask = torch.cat([mask, torch.ones_like(cue)], dim=1)
        positions = kept[:, None] + torch.arange(num_forced, device=self.device)[None, :]
        logits = self._forward(cue, mask, positions, fork)
        state = {"mask": mask}

        def step(next_ids: torch.Tensor, _host: list[int], t: int) -> torch.Tensor:
            state["mask"] = torch.cat(
                [state["mask"], torch.ones(n, 1, dtype=mask.dtype, device=self.device)], dim=1
            )
            return self._forward(next_ids[:, None], state["mask"], (kept + num_forced + t)[:, None], fork)

        return greedy_continuations(logits, max_new_tokens, stop_ids, done, step)
