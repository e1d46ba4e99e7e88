"""Compile once (issue 35): the compiled decode step is not re-traced for new batch sizes or attention widths.

Dynamo's own counter of traced graphs is read over a run whose decode steps go through batches 1 -> 64 and
widths 64 -> 8,192 (and back), the layers asked changing, with Inductor as the step's compiler (as `--compile`
runs it)."""

from __future__ import annotations

import torch
from conftest import make_tiny_lm
from torch._dynamo.utils import counters

from lynx_exit.engine import Engine
from lynx_exit.engine.store_backend import StoreBackend

# (batch, attended width) of successive decode steps: both grow, fall back and cross every power of two
WALK = [(1, 64), (1, 61), (2, 64), (3, 100), (4, 200), (3, 500), (8, 900), (16, 2000), (13, 3000)]
WALK += [(32, 4000), (32, 4100), (64, 5000), (50, 8192), (64, 8192), (1, 8000), (7, 70)]
TAPS = [(), (1, 2), (2,), (0, 1, 2)]
HIDDEN = 36


def test_batches_1_to_64_and_widths_64_to_8192_compile_at_most_three_graphs():
    lm = make_tiny_lm(dtype=torch.float32, layers=2, context=8200)
    assert lm.model.config.hidden_size == HIDDEN
    backend = StoreBackend(lm, compile=True)
    assert backend.graph is not None
    before = counters["stats"]["unique_graphs"]
    next_id = 0
    for batch, width in WALK:
        with torch.inference_mode():
            for request_id in list(backend.rows):
                backend.release(request_id)
            backend.compact(drop_rows=True)
            ids = list(range(next_id, next_id + batch))
            next_id += batch
            backend.prefill(ids, [[5, 6, 7]] * batch)
            # the rows hold `width - 1 - (id % 7)` tokens (what they hold does not matter to a compile)
            backend.store.reserve(batch, width)
            for request_id in ids:
                backend.store.lengths[backend.rows[request_id]] = width - 1 - request_id % 7
            backend.capture(TAPS[len(ids) % len(TAPS)])  # the layers asked change too
            logits = backend.decode(ids, [9] * batch)
            if backend.layers:
                assert backend.hidden_states(ids).shape == (batch, len(backend.layers) * HIDDEN)
        assert logits.shape == (batch, lm.vocab_size) and bool(torch.isfinite(logits).all())
    shapes = backend.graph.shapes
    assert {rows for rows, _ in shapes} >= {1, 64} and max(w for _, w in shapes) == 8192  # the walk ran
    assert backend.graph.steps == len(WALK)  # every step ran compiled, none fell back to eager
    assert counters["stats"]["unique_graphs"] - before <= 3
    # `serve`'s warm-up runs every batch size through the engine, on the graphs already there
    for request_id in list(backend.rows):
        backend.release(request_id)
    compiled = counters["stats"]["unique_graphs"]
    engine = Engine(lm, max_batch_size=5, backend=backend, compile=True)
    steps = backend.graph.steps
    assert engine.warm_up() > 0 and not engine.has_unfinished() and not engine.scheduler.requests
    assert backend.graph.steps - steps >= 4  # decode steps at each of 1, 2, 4 and 5 rows, compiled
    assert {size for size, _ in backend.graph.shapes} >= {1, 2, 4, 5}
    assert counters["stats"]["unique_graphs"] == compiled
    assert Engine(lm, max_batch_size=5).warm_up() == 0.0  # eager ("auto" on a CPU): nothing to warm
