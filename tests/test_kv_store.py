"""The KV store written in place (`StoreBackend`) beside the first backend (one left-padded DynamicCache):
identical tokens through the engine, logits equal to a fresh prefill after any sequence of cache verbs,
clear errors when it is full."""

from __future__ import annotations

import pytest
import torch
from cache_verbs import exercise_cache_verbs
from compile_once import hold_rows
from conftest import CORPUS, make_tiny_lm
from legacy_backend import LegacyBackend
from test_decode import ExitAtCue, FeatureThreshold
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lynx_exit.engine import Engine, GenerationConfig, KVStoreFull, StoreBackend
from lynx_exit.exits import make_policy
from lynx_exit.models import LoadedModel
from lynx_exit.models.profile import resolve_profile
from lynx_exit.reference.tokenizer import train_tokenizer

TEXTS = [
    "What is 3+4?",
    "Hi",
    "A much longer prompt about twelve apples and five pears, so think hard about it.",
    "Tom?",
    "Wait, alternatively: 12 - 5 = 7.",
]


def _tiny(cls, config_cls, seed: int, **sizes) -> LoadedModel:
    tokenizer = train_tokenizer(CORPUS, vocab_size=311)
    config = config_cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **sizes,
    )
    torch.manual_seed(seed)
    model = cls(config).to(torch.float64).eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id="tiny-store", profile=resolve_profile(model, tokenizer)
    )


@pytest.fixture(scope="module")
def gqa_lm() -> LoadedModel:
    """Grouped-query attention (4 query heads on 2 KV heads), odd sizes."""
    return _tiny(
        LlamaForCausalLM,
        LlamaConfig,
        7,
        hidden_size=40,
        intermediate_size=50,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


def make_tiny_sliding_lm() -> LoadedModel:
    """Qwen2 with a 6-token sliding window on its upper layers."""
    return _tiny(
        Qwen2ForCausalLM,
        Qwen2Config,
        3,
        hidden_size=24,
        intermediate_size=44,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    )


@pytest.fixture(scope="module")
def sliding_lm() -> LoadedModel:
    return make_tiny_sliding_lm()


def _scenario(lm: LoadedModel, backend) -> tuple[list, list]:
    """Continuous batching with sampling, exits at cues (the cue token dropped), a probe stand-in on hidden
    states, fork trials (deer) and requests joining late: every result and every streamed step."""
    engine = Engine(lm, max_batch_size=3, backend=backend(lm))
    frequent = GenerationConfig(
        max_new_tokens=28,
        min_new_tokens=20,
        temperature=0.9,
        top_p=0.9,
        cue_regex="[ae]",
        answer_max_tokens=6,
    )
    layers = lm.feature_spec().layers
    plans = [
        (TEXTS[0], None),
        (TEXTS[1], ExitAtCue(k=2)),
        (TEXTS[2], FeatureThreshold(0.0, feature_spec=lm.feature_spec())),
        (TEXTS[3], make_policy("deer", threshold=0.05)),
        (TEXTS[4], ExitAtCue(k=1)),
    ]
    ids, steps = [], []
    for i, (text, policy) in enumerate(plans):
        ids.append(
            engine.add_request(
                lm.prompt_ids(text),
                frequent,
                policy=policy,
                seed=i + 1,
                feature_layers=layers if policy is not None else None,
            )
        )
        for _ in range(i * 3):
            steps += [(s.request_id, s.token_id, s.phase, s.exit) for s in engine.step()]
    steps += [(s.request_id, s.token_id, s.phase, s.exit) for s in engine.stream()]
    results = [engine.result(i) for i in ids]
    return steps, [(r.token_ids, r.exit_index, r.finish_reason, r.text) for r in results]


@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_engine_tokens_are_identical_on_both_backends(tiny_lm, gqa_lm, which):
    lm = tiny_lm if which == "mha" else gqa_lm
    old_steps, old = _scenario(lm, LegacyBackend)
    new_steps, new = _scenario(lm, StoreBackend)
    assert new == old
    assert new_steps == old_steps
    assert any(finish == "exit" for _, _, finish, _ in new)  # the scenario did exit, on cue and on the probe


def _fresh_logits(lm: LoadedModel, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([token_ids]), use_cache=False).logits[0, -1]


@pytest.mark.parametrize(
    "which", ["gqa", "sliding", "gqa-matmul-decode", "mha-matmul-decode", "sliding-compiled-padded"]
)
def test_any_sequence_of_cache_verbs_equals_a_fresh_prefill(tiny_lm, gqa_lm, sliding_lm, which, monkeypatch):
    """prefill, decode, extend (several tokens in one pass), truncate (any number), release, compact and fork:
    after each, every live request's next-token logits equal the model's own forward over its token list.
    The matmul variants run the CPU decode path; the others SDPA, as on a GPU. The compiled variant runs the
    decodes of every live request as the compiled step padded to buckets, as on a GPU (sliding window,
    GQA)."""
    lm = {
        "gqa": gqa_lm,
        "sliding": sliding_lm,
        "gqa-matmul-decode": gqa_lm,
        "mha-matmul-decode": tiny_lm,
        "sliding-compiled-padded": make_tiny_sliding_lm(),
    }[which]
    if not which.endswith("matmul-decode"):  # SDPA for the decode too (what a GPU runs)
        monkeypatch.setattr("lynx_exit.engine.attention.CPU_MATMUL_DECODE", False)
    compiled = which.endswith("compiled-padded")
    backend = StoreBackend(lm, compile=compiled)
    if compiled:
        backend.graph.pad = True
    # Compiled, the rotary angles (float32 in every model) take Inductor's vectorised cos/sin: 1 ulp of
    # float32 apart
    tolerance = 1e-5 if compiled else 1e-9
    exercise_cache_verbs(
        backend, lm.model.config.vocab_size, lambda tokens: _fresh_logits(lm, tokens), tolerance
    )
    if compiled:
        assert backend.graph.steps >= 3


def test_a_full_store_says_what_does_not_fit(tiny_lm):
    tiny = make_tiny_lm(context=40)
    backend = StoreBackend(tiny)
    with pytest.raises(KVStoreFull, match="context limit 40"):
        backend.prefill([0], [list(range(3, 45))])
    assert backend.rows == {}  # nothing of the failed prefill is held
    budget = StoreBackend(tiny_lm, kv_cache_gb=2e-6)  # about 2 KiB: a few tokens of the tiny model
    with pytest.raises(KVStoreFull, match="GiB holds .* tokens"):
        budget.prefill([0, 1], [list(range(3, 30)), list(range(3, 30))])
    with pytest.raises(ValueError, match="kv_cache_gb must be > 0"):
        StoreBackend(tiny_lm, kv_cache_gb=0)


def test_a_request_ends_at_the_context_limit_and_the_others_run_as_alone():
    """A request that reaches the model's last position ends with `length` (never past the store); the
    request beside it is unchanged."""
    short = make_tiny_lm(context=96)
    engine = Engine(short, max_batch_size=2)
    config = GenerationConfig(max_new_tokens=200, min_new_tokens=200, temperature=0.8)
    prompt = short.prompt_ids(TEXTS[2])
    long_id = engine.add_request(prompt, config, seed=1)
    fine = GenerationConfig(max_new_tokens=10, temperature=0.8)
    short_id = engine.add_request(short.prompt_ids(TEXTS[1]), fine, seed=2)
    list(engine.stream())
    result = engine.result(long_id)
    assert engine.error(long_id) is None and result.finish_reason == "length"
    assert len(prompt) + result.num_generated_tokens == 96
    alone = Engine(short, max_batch_size=1)
    alone_id = alone.add_request(short.prompt_ids(TEXTS[1]), fine, seed=2)
    list(alone.stream())
    assert engine.result(short_id).token_ids == alone.result(alone_id).token_ids


def test_chunked_prefill_reads_a_long_prompt_while_the_others_decode(tiny_lm):
    """Under a budget of 5 prompt tokens per step, a long prompt joins over several steps; the running request
    gets a token at every one of them, and every result equals the one read in a single pass."""
    config = GenerationConfig(max_new_tokens=30, min_new_tokens=30, temperature=0.9, cue_regex="e")
    long_prompt = tiny_lm.prompt_ids(TEXTS[2] + " " + TEXTS[4])

    def run(budget: int) -> tuple[list, list[int]]:
        engine = Engine(tiny_lm, max_batch_size=3, prefill_tokens_per_step=budget)
        first = engine.add_request(tiny_lm.prompt_ids(TEXTS[0]), config, seed=1)
        while not any(s.request_id == first for s in engine.step()):  # its own prompt is read in chunks too
            pass
        second = engine.add_request(long_prompt, config, seed=2)
        third = engine.add_request(tiny_lm.prompt_ids(TEXTS[1]), config, seed=3)
        per_step = []
        while engine.has_unfinished():
            per_step.append({s.request_id for s in engine.step()})
        return [engine.result(i).token_ids for i in (first, second, third)], [
            first in ids for ids in per_step
        ]

    chunked, first_ran = run(5)
    whole, _ = run(4096)
    assert chunked == whole
    reading_steps = -(-len(long_prompt) // 5)
    assert reading_steps >= 8 and all(first_ran[:reading_steps])  # the first request never waited


def test_bad_prefill_budget_is_named(tiny_lm):
    with pytest.raises(ValueError, match="prefill_tokens_per_step"):
        Engine(tiny_lm, prefill_tokens_per_step=0)


# -- compile once (issue 35) -----------------------------------------------------------------------------
# The compiled decode step is not traced again for new batch sizes, attention widths or layers asked: dynamo's
# own counter of traced graphs over decode steps through batches 1 -> 64 and widths 64 -> 8,192 (and back),
# with Inductor as the step's compiler (as `--compile` runs it). (batch, width) of successive steps:
WALK = [(1, 64), (1, 61), (2, 64), (3, 100), (4, 200), (3, 500), (8, 900), (16, 2000), (13, 3000)]
WALK += [(32, 4000), (32, 4100), (64, 5000), (50, 8192), (64, 8192), (1, 8000), (7, 70)]
TAPS = [(), (1, 3), (2,), (1, 2, 3)]  # of the layers a probe reads by default, (1, 2, 3)
HIDDEN = 36


def test_batches_1_to_64_and_widths_64_to_8192_compile_at_most_three_graphs(compiled_lm):
    # the model is shared: the next test reuses what this one compiles (no other model class in between:
    # transformers' registry of output-capturing classes is one of the step's guards)
    lm = compiled_lm
    assert lm.model.config.hidden_size == HIDDEN
    backend = StoreBackend(lm, compile=True)
    assert backend.graph is not None
    before = counters["stats"]["unique_graphs"]
    next_id = 0
    for batch, width in WALK:
        with torch.inference_mode():
            ids = hold_rows(backend, next_id, batch, width)
            next_id += batch
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


def test_compiled_decode_steps_match_eager(compiled_lm):
    """`--compile` (Inductor on a CPU): the compiled decode step gives the eager tokens, exits and probe
    features, with late joiners and requests ending; at exact shapes (a CPU's default) and padded to the
    buckets of CUDA graphs (an odd batch padded to 4 rows, widths to 64 columns and more); with overlap
    too."""
    eager_lm = make_tiny_lm(seed=5)
    config = GenerationConfig(
        max_new_tokens=70, min_new_tokens=40, temperature=0.8, cue_regex="[ae]", answer_max_tokens=4
    )

    def run(lm, compile, pad=False, overlap=False):
        engine = Engine(lm, max_batch_size=3, compile=compile, overlap=overlap)
        if compile:
            engine.backend.graph.pad = pad
        policies = [None, FeatureThreshold(0.0, feature_spec=lm.feature_spec()), ExitAtCue(k=3), None]
        ids = [
            engine.add_request(lm.prompt_ids(text), config, policy=policy, seed=i)
            for i, (text, policy) in enumerate(zip(TEXTS, policies, strict=False))
        ]
        list(engine.stream())
        results = [engine.result(i) for i in ids]
        launched[overlap] = engine.ahead_held
        return [
            (r.token_ids, r.finish_reason, r.exit_index, r.cue_indices) for r in results
        ], engine.backend.graph

    launched: dict[bool, int] = {}
    eager, _ = run(eager_lm, False)
    assert any(exit_index is not None for _, _, exit_index, _ in eager)
    exact, graph = run(compiled_lm, True)
    assert exact == eager
    assert graph.steps > 50 and {size for size, _ in graph.shapes} == {1, 2, 3}
    overlapped, graph = run(compiled_lm, True, overlap=True)  # the next step launched before the host reads
    assert (
        overlapped == eager
        and graph.steps > 50
        and launched == {False: 0, True: launched[True]}
        and (launched[True] > 20)
    )
    padded, graph = run(compiled_lm, True, pad=True)
    assert padded == eager
    widths = {width for _, width in graph.shapes}
    # buckets of 64 columns, then the next, never the store's whole capacity (128 here: 127)
    assert {size for size, _ in graph.shapes} == {1, 2, 4} and 64 in widths and max(widths) in (127, 128)


def test_under_a_kv_budget_requests_that_fit_wait_and_all_finish_as_alone():
    """Under a budget with room for about 2.5 requests at their largest, 8 requests that each
    fit all
    finish, with the tokens each gets alone: admitted as the cache holds now, the youngest preempted when
    the others outgrow the budget and recomputed when memory frees; one that cannot fit the whole budget is
    refused at once, naming both numbers."""
    lm = make_tiny_lm(seed=2)
    per_token = 3 * 2 * 3 * 12 * 8  # layers x (keys, values) x kv heads x head dim x float64 bytes
    config = GenerationConfig(
        max_new_tokens=60, min_new_tokens=40, temperature=0.8, cue_regex="e", answer_max_tokens=5
    )
    prompts = [lm.prompt_ids(TEXTS[i % len(TEXTS)]) for i in range(8)]
    cue = len(lm.exit_cue_ids())
    largest = max(len(p) for p in prompts) + config.max_new_tokens + cue + config.answer_max_tokens
    engine = Engine(lm, max_batch_size=8, kv_cache_gb=int(2.5 * largest) * per_token / 2**30)
    assert engine.backend.token_budget() == int(2.5 * largest)
    ids = [
        engine.add_request(p, config, seed=i, policy=ExitAtCue(k=2) if i % 2 else None)
        for i, p in enumerate(prompts)
    ]
    running = []
    while engine.has_unfinished():
        engine.step()
        running.append(engine.num_running)
    assert (
        3 <= max(running) < 8 and engine.scheduler.preemptions > 0
    )  # memory, not the batch size, held them back
    for i, (request_id, prompt) in enumerate(zip(ids, prompts, strict=True)):
        assert engine.error(request_id) is None
        alone = Engine(lm, max_batch_size=1)
        alone_id = alone.add_request(prompt, config, seed=i, policy=ExitAtCue(k=2) if i % 2 else None)
        list(alone.stream())
        assert engine.result(request_id).token_ids == alone.result(alone_id).token_ids
    assert engine.backend.store.allocated_bytes() <= int(2.5 * largest) * per_token
    with pytest.raises(
        ValueError,
        match=rf"need {largest + 300} tokens of KV cache; the cache budget holds {int(2.5 * largest)}",
    ):
        engine.add_request(
            prompts[2],
            GenerationConfig(
                max_new_tokens=config.max_new_tokens + 300, answer_max_tokens=5, temperature=0.8
            ),
        )


def test_decode_buckets_cover_every_row_and_bound_the_waste():
    """Padded shapes (CUDA graphs): the batch bucket is a power of two >= n; the width bucket holds the
    longest row, never passes the store's capacity, and wastes at most 1/8 of its columns past 512."""
    from lynx_exit.engine.decode_graph import bucket, width_bucket

    for n in range(1, 300):
        size = bucket(n)
        assert size >= n and size & (size - 1) == 0 and size < 2 * n + 1
    for longest in range(1, 20000, 7):
        width = width_bucket(longest, 1 << 20)
        assert longest <= width and (longest <= 512 or (width - longest) * 8 <= width)
        assert width_bucket(longest, longest) == longest
    assert len({width_bucket(n, 1 << 20) for n in range(1025, 2049)}) == 8  # eight graphs per octave


def _strided_sdpa(monkeypatch) -> list[bool]:
    """SDPA with CUDA's output layout: the same values, not contiguous (CUDA's kernel for a grouped query with
    a mask returns this; the CPU kernel a contiguous tensor). Returns a list that records each call's
    layout."""
    real = torch.nn.functional.scaled_dot_product_attention
    seen: list[bool] = []

    def strided(*args, **kwargs):
        out = real(*args, **kwargs)
        out = out.transpose(-1, -2).contiguous().transpose(-1, -2)
        seen.append(out.is_contiguous())
        return out

    monkeypatch.setattr("lynx_exit.engine.attention.F.scaled_dot_product_attention", strided)
    return seen


def test_cuda_branches_run_on_a_cpu_with_mixed_lengths(gqa_lm, monkeypatch):
    """The branches a GPU takes (grouped SDPA with a mask, its strided output), run here: a batch of rows of
    different lengths decodes, and every greedy token is the argmax of a fresh forward over the row's tokens.
    On 5aada8b this is the crash seen on an H200 ("view size is not compatible with input tensor's size")."""
    from lynx_exit.engine.attention import device_branches

    seen = _strided_sdpa(monkeypatch)
    lm = gqa_lm
    config = GenerationConfig(max_new_tokens=6, temperature=0.0, cue_regex="[ae]")
    prompts = [lm.prompt_ids(t) for t in TEXTS]
    with device_branches("cuda"):
        engine = Engine(lm, max_batch_size=4, backend=StoreBackend(lm))
        ids = [engine.add_request(p, config) for p in prompts]
        list(engine.stream())
    assert seen and not any(seen)  # the strided layout reached the store's attention
    assert len({len(p) for p in prompts}) > 1  # rows of different lengths: decode steps with a mask
    for request_id, prompt in zip(ids, prompts, strict=True):
        tokens = engine.result(request_id).token_ids
        assert tokens
        for i, token in enumerate(tokens):
            if token in lm.eos_token_ids and i == len(tokens) - 1:
                continue
            assert int(_fresh_logits(lm, prompt + tokens[:i]).argmax()) == token


def test_device_branches_names_a_bad_device():
    from lynx_exit.engine.attention import device_branches

    with pytest.raises(ValueError, match="'tpu'"), device_branches("tpu"):
        pass
