"""The vLLM plug-in's logic without vLLM: its per-request tracker, driven by a Hugging Face decode loop that
feeds it as vLLM's V1 runner does (committed tokens, the fed token's position and the probe's scores), against
lynx-exit's own engine with the look-ahead exit prefix; its settings, exit marker and exit report; the
look-ahead prefix in the engine and in build-data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.engine.kv_store import cache_kwarg
from lynx_exit.exits.lynx import LynxPolicy
from lynx_exit.exits.registry import ExitSettingError, MethodContext, make_policy
from lynx_exit.models import load_model
from lynx_exit.models.loading import REFERENCE_MODELS, load_model_facts
from lynx_exit.probe import load_probe
from lynx_exit.probe.build_data import BuildConfig, _kept, _with_lookahead
from lynx_exit.probe.model import AllKindsScorer
from lynx_exit.reference import as_task_problems, make_problems
from lynx_exit.vllm.scores import StepFeatures, score_handles
from lynx_exit.vllm.settings import request_exit
from lynx_exit.vllm.tracker import GREEDY, TrackerFactory, exit_marker, read_exit

PROBE = str(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "probe_reference")
MAX_NEW = 200


@pytest.fixture(scope="module")
def reference() -> Any:
    return load_model("reference")


@pytest.fixture(scope="module")
def factory() -> TrackerFactory:
    return TrackerFactory(load_model_facts(str(REFERENCE_MODELS["reference"])), PROBE)


def drive(
    lm: Any, factory: TrackerFactory, prompt: list[int], extra: dict[str, Any]
) -> tuple[list[int], Any]:
    """A greedy HF decode loop that steps the tracker as the plug-in's processor does: the fed token's
    features from this step's forward, a point scored when it is read, a forced token replacing the sampled
    one."""
    settings = request_exit(extra, factory.context)
    assert settings is not None and factory.marker is not None
    tracker = factory.tracker(settings, len(prompt), stop_ids=[factory.marker])
    bundle = factory.context.loaded_probe()[0]
    scorer = AllKindsScorer(bundle.probe)
    outputs: list[int] = []
    past, feed, keyword = None, torch.tensor([prompt]), cache_kwarg(lm.model)
    with torch.inference_mode():
        while len(outputs) < MAX_NEW + 80:
            out = lm.model(input_ids=feed, use_cache=True, output_hidden_states=True, **{keyword: past})
            past = out.past_key_values
            position = len(prompt) + len(outputs) - 1
            features = torch.cat([out.hidden_states[layer][0, -1] for layer in bundle.spec.layers])[
                None
            ].float()
            handle = tracker.advance(outputs, position, (StepFeatures.of_rows(features, [position]), 0))
            while handle is not None:
                handle = tracker.resume(outputs, score_handles([handle], scorer)[0])
            forced = tracker.force(outputs)
            token = int(out.logits[0, -1].argmax()) if forced in (None, GREEDY) else forced
            outputs.append(token)
            if (
                token in lm.eos_token_ids
                or token == factory.marker
                or (tracker.phase == "think" and len(outputs) >= MAX_NEW)
            ):
                break
            feed = torch.tensor([[token]])
    return outputs, tracker


@pytest.mark.parametrize(
    "extra",
    [
        {"lynx_delta": 0.2, "lynx_decision_points": "cue"},
        {"lynx_method": "lynx-trajectory", "lynx_delta": 0.1, "lynx_decision_points": "cue,answer,paragraph"},
    ],
)
def test_tracker_in_a_decode_loop_matches_the_engine(
    reference: Any, factory: TrackerFactory, extra: dict[str, Any]
) -> None:
    prompts = [reference.prompt_ids(p.prompt) for p in as_task_problems(make_problems("test", 4), "test")]
    options = {key.removeprefix("lynx_"): value for key, value in extra.items()}
    method = options.pop("method", "lynx")
    context = MethodContext(lm=reference, probe=PROBE)
    results = DecodeLoop(
        reference,
        prompts,
        GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0),
        policies=[make_policy(method, context, exit_prefix="lookahead", **options) for _ in prompts],
    ).run()
    exits = 0
    for prompt, result in zip(prompts, results, strict=True):
        outputs, tracker = drive(reference, factory, prompt, extra)
        report = read_exit(outputs, outputs[-1], factory.marker, factory.exit_cue_ids)
        assert report.exit_index == result.exit_index == tracker.exit_index
        assert (outputs[:-1] if report.exited else outputs[:MAX_NEW]) == result.token_ids
        if report.exited:
            exits += 1
            kept = result.token_ids[result.exit_index + 2 :][: len(factory.exit_cue_ids)]
            assert kept == factory.exit_cue_ids  # the cue and its look-ahead stay, then the exit cue
            assert tracker.exit_point == result.exit_point
    assert exits >= 2


def test_tracker_acts_only_on_the_frontier_token(factory: TrackerFactory) -> None:
    """A prompt chunk (its sampled token is discarded) and a stale position change nothing."""
    settings = request_exit({"lynx_delta": 0.2}, factory.context)
    assert settings is not None
    tracker = factory.tracker(settings, prompt_len=10)
    handle = (StepFeatures.of_rows(torch.zeros(1, 4), [0]), 0)
    assert tracker.advance([], 5, handle) is None and tracker.advance([7, 8], 10, handle) is None
    assert tracker.read == 0 and tracker.handles == {} and tracker.force([7, 8]) is None
    tracker.advance([7, 8], 11, handle)
    assert tracker.read == 1 and 1 in tracker.handles


def test_settings_use_the_exit_objects_names_and_checks(factory: TrackerFactory) -> None:
    context = factory.context
    assert request_exit({"temperature_hint": 1}, context) is None  # no lynx_ key: the request runs untouched
    settings = request_exit(
        {"lynx_method": "lynx-harm", "lynx_delta": "0.05", "lynx_answer_max_tokens": 12}, context
    )
    assert settings is not None and settings.method == "lynx-harm" and settings.answer_max_tokens == 12
    assert dict(settings.options)["exit_prefix"] == "lookahead"
    cases = {
        "lynx_delta": (0.123, "calibrated"),
        "lynx_mode": ("sometimes", "sometimes"),
        "lynx_decision_points": ("cue,comma", "comma"),
        "lynx_method": ("nowait", "lynx-harm"),
        "lynx_exit_prefix": ("point", "look-ahead"),
        "lynx_answer_max_tokens": (0, "[1, 4096]"),
    }
    for key, (value, words) in cases.items():
        with pytest.raises(ExitSettingError) as caught:
            request_exit({"lynx_delta": 0.05, key: value}, context)
        assert caught.value.param == key and key in str(caught.value) and words in str(caught.value)
    with pytest.raises(ExitSettingError, match="lynx_delta"):
        request_exit({"lynx_mode": "event"}, context)


def test_exit_marker_and_report(factory: TrackerFactory) -> None:
    lm = factory.lm
    marker = exit_marker(lm)
    assert marker == lm.tokenizer.pad_token_id and marker not in lm.eos_token_ids  # the reference's <|pad|>
    cue = factory.exit_cue_ids
    ids = [40, 41, 42, 43, *cue, 55, 56, marker]
    report = read_exit(ids, marker, marker, cue)
    assert report.exited and report.exit_index == 2 and report.answer_token_ids == (55, 56)
    assert not read_exit(ids, None, marker, cue).exited  # a natural end: stop_reason None
    with pytest.raises(ValueError, match="no exit cue"):
        read_exit([1, 2, marker], marker, marker, cue)


def test_engine_lookahead_prefix_keeps_the_point_and_the_next_token(reference: Any) -> None:
    prompts = [reference.prompt_ids(p.prompt) for p in as_task_problems(make_problems("test", 4), "test")]
    context = MethodContext(lm=reference, probe=PROBE)
    config = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0)
    point = DecodeLoop(
        reference, prompts, config, policies=[make_policy("lynx", context, delta=0.2) for _ in prompts]
    ).run()
    ahead = DecodeLoop(
        reference,
        prompts,
        config,
        policies=[make_policy("lynx", context, delta=0.2, exit_prefix="lookahead") for _ in prompts],
    ).run()
    cue = reference.exit_cue_ids("boxed")
    compared = 0
    for a, b in zip(point, ahead, strict=True):
        if a.exit_index is None or a.exit_point != "cue":
            continue
        compared += 1
        assert b.exit_index == a.exit_index
        assert (
            a.token_ids[a.exit_index : a.exit_index + len(cue)] == cue
        )  # the paper's: the cue token is dropped
        assert b.token_ids[: b.exit_index] == a.token_ids[: a.exit_index]
        assert b.token_ids[b.exit_index + 2 : b.exit_index + 2 + len(cue)] == cue
        assert b.reasoning_tokens == a.reasoning_tokens + 2
    assert compared >= 1


def test_the_probe_says_its_exit_prefix(tmp_path: Path) -> None:
    bundle = load_probe(Path(PROBE))
    assert bundle.exit_prefix == "point"  # made before the look-ahead prefix: the paper's
    bundle.meta["exit_prefix"] = "lookahead"
    assert LynxPolicy(bundle=bundle, delta=0.2).exit_prefix == "lookahead"
    assert LynxPolicy(bundle=bundle, delta=0.2, exit_prefix="point").exit_prefix == "point"
    with pytest.raises(ValueError, match="unknown exit prefix"):
        LynxPolicy(bundle=bundle, delta=0.2, exit_prefix="both")
    with pytest.raises(ValueError, match="unknown exit prefix"):
        BuildConfig(exit_prefix="later")


def test_build_data_labels_the_lookahead_prefix() -> None:
    class Result:
        def __init__(self, ids: list[int]) -> None:
            self.token_ids = ids

    events = [
        {"row": 0, "token_index": 1, "point": "cue", "synthetic": False},
        {"row": 0, "token_index": 3, "point": "paragraph", "synthetic": False},  # the next token is EOS
        {"row": 1, "token_index": 2, "point": "cue", "synthetic": False},
    ]  # nothing after it
    kept, vectors = _with_lookahead(
        events, [torch.zeros(1)] * 3, [Result([5, 6, 7, 8, 2]), Result([5, 6, 7])], {2}
    )
    assert [e["token_index"] for e in kept] == [1] and len(vectors) == 1
    assert (
        _kept(events[0], "lookahead") == 3
        and _kept(events[0], "point") == 1
        and _kept(events[1], "point") == 4
    )


def test_all_kinds_scorer_equals_the_probe_per_kind() -> None:
    probe = load_probe(Path(PROBE)).probe.float()
    features = torch.randn(
        9, probe.mean.shape[0] - len(probe.kinds), generator=torch.Generator().manual_seed(3)
    )
    fused = AllKindsScorer(probe)(features)
    assert fused.shape == (9, len(probe.kinds))
    for k, kind in enumerate(probe.kinds):
        assert torch.allclose(fused[:, k], probe.prob_safe(features, [kind] * 9), atol=1e-6)


def test_bulk_reads_equal_token_by_token_reads(factory: TrackerFactory) -> None:
    """What the pre-filter relies on: a bulk push adds the text the pushes one by one add (multi-byte
    characters included), and appended text leaves the detector finding the same cues."""
    from lynx_exit.cues import IncrementalDetokenizer

    tokenizer = factory.lm.tokenizer
    ids = tokenizer.encode(
        "Tom has 3 apples – “wait”, ça coûte 5 €. Hmm, wait: 7 + 8 = 15.\n", add_special_tokens=False
    )
    one, bulk = IncrementalDetokenizer(tokenizer), IncrementalDetokenizer(tokenizer)
    text_one = "".join(one.push(i) for i in ids)
    text_bulk = bulk.push_many(ids[:9]) + bulk.push_many(ids[9:20]) + "".join(bulk.push(i) for i in ids[20:])
    assert text_one == text_bulk == tokenizer.decode(ids)
    settings = request_exit({"lynx_delta": 0.2}, factory.context)
    assert settings is not None
    tracker = factory.tracker(settings, prompt_len=0)
    chars = tracker.detector.completing_chars()  # type: ignore[attr-defined]
    assert chars is not None and {"t", "T", "m", "y", ">"} <= chars
    assert tracker.skippable is not None and not all(tracker.skippable) and any(tracker.skippable)
