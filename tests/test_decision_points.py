"""Decision points beyond cue words (answers, paragraph ends), their calibration per kind and as one stopping
rule, and the give-up threshold: detection on every family's format, refusals, the guarantees on synthetic
data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_families import FAMILY_SHAPES, family_lm, run_scripted

from lynx_exit.cues import compile_cue_pattern
from lynx_exit.decision_points import PointDetector, compile_point_pattern, parse_points, points_key
from lynx_exit.engine.types import Decision, Step
from lynx_exit.exits import LynxPolicy
from lynx_exit.exits.registry import BasePolicy, parse_methods
from lynx_exit.probe import Probe, ProbeBundle, ProbeTrainConfig, train_probe
from lynx_exit.probe.conformal import (
    EventThreshold,
    GiveUpThreshold,
    TrajectoryThreshold,
    calibrate_events,
    calibrate_give_up,
    calibrate_trajectories,
    give_up_loss,
    trajectory_loss,
    trajectory_losses,
)

ALL = ("cue", "answer", "paragraph")


def detect(text: str, chunk: int, kinds=ALL, **kwargs) -> list[tuple[str, str]]:
    """Stream `text` in pieces of `chunk` characters; (kind, text so far) at each decision point."""
    detector = PointDetector(
        compile_cue_pattern(), kinds=kinds, think_end="</think>", max_cue_chars=13, **kwargs
    )
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    found = []
    for i, piece in enumerate(pieces):
        detector.step(piece, pieces[i + 1] if i + 1 < len(pieces) else "")
        if detector.point is not None:
            found.append((detector.point, "".join(pieces[: i + 1])))
    return found


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_a_boxed_answer_split_across_tokens_with_nested_braces_is_one_answer_point(chunk):
    text = "so x = \\boxed{\\frac{1}{2}} is it"
    found = detect(text, chunk, kinds=("answer",))
    assert len(found) == 1
    kind, upto = found[0]
    closing = text.index("}} is") + 2  # the outer brace closes here
    assert kind == "answer" and closing <= len(upto) < closing + chunk


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_an_answer_phrase_is_a_point_once_its_number_is_complete_and_not_inside_a_quotation(chunk):
    text = 'The problem says "if the answer is 5 then stop". Working: the answer is 425, so. '
    found = detect(text, chunk, kinds=("answer",))
    assert [kind for kind, _ in found] == ["answer"]
    assert "425" in found[0][1] and found[0][1].count("answer is") == 2  # the quoted one was passed over
    # curly quotes too, and a quotation that closed leaves the next phrase an answer
    assert detect("“the answer is 5” and the answer is 6. ", chunk, kinds=("answer",))[0][1].endswith(
        ("6.", "6. ")
    )


def test_paragraphs_cues_and_the_priority_when_one_token_completes_several():
    text = "Step one.\n\nWait, the answer is 7.\n\nDone.</think> the answer is 9. Wait, \n\n"
    found = detect(text, 1)
    assert [kind for kind, _ in found] == [
        "paragraph",
        "cue",
        "answer",
        "paragraph",
    ]  # nothing after </think>
    # one token holding a cue word's boundary and a stated answer's confirmation is an answer point
    assert detect("the answer is 7. Wait, ", 100)[0][0] == "answer"
    # a family's own step separator: the reference model writes a step per line
    lines = detect(
        "a\nb\nc", 1, kinds=("paragraph",), step_separator=compile_point_pattern("step separator", r"\n")
    )
    assert [upto for _, upto in lines] == ["a\n", "a\nb\n"]


def test_point_kinds_parse_and_name_the_bad_one():
    assert parse_points("answer, cue") == ("cue", "answer") == parse_points(["answer", "cue"])
    assert points_key(("paragraph", "cue")) == "cue+paragraph" and parse_points("cue+paragraph") == (
        "cue",
        "paragraph",
    )
    for bad, needle in (("cue,hunch", "'hunch'"), ("", "at least one"), (3, "list")):
        with pytest.raises(ValueError, match=needle):
            parse_points(bad)
    with pytest.raises(ValueError, match="matches empty text"):
        compile_point_pattern("step separator", r"\n*")


class Recorder(BasePolicy):
    decision_points = ALL
    name = "recorder"


@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_every_family_finds_its_points_inside_thinking_only(monkeypatch, name):
    *_, opens, closes = FAMILY_SHAPES[name]
    lm = family_lm(name)
    thinking = 'Hmm, "the answer is 5" is quoted. 3 + 4 = 7.\n\nWait, the answer is 7. So \\boxed{7} ok\n\n'
    after = " the answer is 7 \\boxed{7}. Wait,\n\nok"
    if lm.profile.think_end is None:  # no markers: everything is thinking
        written = thinking
    else:
        written = (
            ("Wait. the answer is 1. " if lm.profile.thinking == "model" else "")
            + opens
            + thinking
            + closes
            + after
        )
    steps, result = run_scripted(monkeypatch, lm, written, policy=Recorder())
    points = [(s.point, s.index) for s in steps if s.point is not None]
    assert [kind for kind, _ in points] == ["cue", "paragraph", "cue", "answer", "answer", "paragraph"], (
        name,
        points,
    )
    text_at = {index: lm.tokenizer.decode(result.token_ids[: index + 1]) for _, index in points}
    answer_texts = [text_at[index] for kind, index in points if kind == "answer"]
    assert "answer is 7" in answer_texts[0] and answer_texts[1].rstrip().endswith("\\boxed{7}")
    assert all(s.point is None for s in steps if s.phase != "think")


def tiny_probe(kinds=("cue",), dim: int = 6) -> Probe:
    torch.manual_seed(0)
    features = torch.randn(40, dim)
    labels = (features[:, 0] > 0).long()
    points = [kinds[i % len(kinds)] for i in range(40)] if len(kinds) > 1 else None
    probe, _ = train_probe(features, labels, ProbeTrainConfig(max_epochs=3), points)
    return probe


def bundle_of(
    probe: Probe, lm=None, give_up: GiveUpThreshold | None = None, trajectory: float = math.inf
) -> ProbeBundle:
    kinds = probe.kinds
    spec = lm.feature_spec() if lm is not None else None
    return ProbeBundle(
        probe=probe,
        spec=spec,
        meta={},  # type: ignore[arg-type]
        event_thresholds=[EventThreshold(0.1, 0.2, 0.5, 50, 50, point=kind) for kind in kinds],
        trajectory_thresholds=[TrajectoryThreshold(0.1, 0.1, trajectory, 100, 0.0, points=points_key(kinds))],
        harm_thresholds=[],
        give_up_thresholds=[give_up] if give_up else [],
    )


def test_a_probe_trained_on_cues_refuses_answer_points():
    probe = tiny_probe(("cue",))
    assert probe.kinds == ("cue",)
    bundle = bundle_of(probe)
    with pytest.raises(ValueError, match="never saw answer"):
        LynxPolicy(bundle=bundle, delta=0.1, decision_points=("cue", "answer"))
    with pytest.raises(ValueError, match="not \\['answer'\\]"):
        probe.prob_safe(torch.zeros(1, 6), ["answer"])
    LynxPolicy(bundle=bundle, delta=0.1)  # its own kind is fine
    # a probe of two kinds reads the kind: the same hidden state scores differently as a cue and as an answer
    both = tiny_probe(("cue", "answer"))
    assert both.kinds == ("cue", "answer") and both.net[0].in_features == 6 + 2
    row = torch.randn(1, 6)
    assert not torch.equal(both.prob_safe(row, ["cue"]), both.prob_safe(row, ["answer"]))
    with pytest.raises(ValueError, match="needs each row's kind"):
        both.prob_safe(row)
    with pytest.raises(ValueError, match="no event-level calibration for paragraph"):
        bundle_of(both).event_threshold(0.1, "paragraph")


def test_per_kind_calibration_keeps_the_guarantee_where_pooling_breaks_it():
    """Two kinds: the probe separates cues well but is over-confident at answers. Calibrated on both pooled,
    an unsafe answer point exits far more often than δ; calibrated per kind, each kind's rate stays within
    δ."""
    rng = np.random.default_rng(0)
    delta, n, rates = 0.1, 600, {"pooled": [], "per kind": []}
    for _ in range(100):
        kinds = rng.choice(["cue", "answer"], size=2 * n, p=[0.8, 0.2])
        labels = rng.random(2 * n) < 0.5
        scores = np.where(
            labels,
            rng.beta(5, 2, 2 * n),
            np.where(kinds == "cue", rng.beta(1, 6, 2 * n), rng.beta(4, 2, 2 * n)),
        )
        calib, test = slice(0, n), slice(n, 2 * n)
        pooled = calibrate_events(scores[calib], labels[calib], delta)
        own = {
            k: calibrate_events(
                scores[calib][kinds[calib] == k], labels[calib][kinds[calib] == k], delta, point=k
            )
            for k in ("cue", "answer")
        }
        unsafe_answers = np.flatnonzero((kinds[test] == "answer") & ~labels[test])
        for name, rule in (("pooled", pooled), ("per kind", own["answer"])):
            exits = [rule.should_exit(float(scores[test][i])) for i in unsafe_answers]
            rates[name].append(np.mean(exits) if len(unsafe_answers) else 0.0)
    assert np.mean(rates["per kind"]) <= delta + 0.01
    assert np.mean(rates["pooled"]) > 2 * delta


def many_checks(
    rng: np.random.Generator, traces: int
) -> list[tuple[list[float], list[int], list[int], bool, list[str]]]:
    """Traces with 10-30 points of two kinds; most turn safe in their first half, the rest never do, and
    answer points carry more signal than cues. Each: (scores, labels, token indices, full chain right,
    kinds)."""
    out = []
    for _ in range(traces):
        m = int(rng.integers(10, 31))
        kinds = list(rng.choice(["cue", "answer"], size=m, p=[0.7, 0.3]))
        turn = int(rng.integers(0, m // 2)) if rng.random() < 0.7 else m  # 30 % never turn safe: lost traces
        labels = [int(i >= turn) for i in range(m)]
        noise = [0.1 if k == "answer" else 0.2 for k in kinds]
        scores = [
            float(np.clip(0.5 + (lab - 0.5) * 0.8 + rng.normal(0, s), 0, 1))
            for lab, s in zip(labels, noise, strict=True)
        ]
        tokens = sorted(int(t) for t in rng.integers(0, 400, size=m))
        out.append((scores, labels, tokens, bool(labels[-1]), kinds))
    return out


def test_the_combined_stopping_rule_keeps_its_per_trace_risk_over_random_splits():
    """The first crossing over all enabled kinds, calibrated as one rule with one loss per trace: over many
    random calibration/test splits the realized risk is within δ on average, and above it no more often than ε
    allows."""
    rng = np.random.default_rng(1)
    delta, epsilon = 0.1, 0.1
    data = many_checks(rng, 1200)
    realized, exits = [], 0
    for _ in range(80):
        order = rng.permutation(len(data))
        calib, test = [data[i] for i in order[:600]], [data[i] for i in order[600:]]
        rule = calibrate_trajectories([(s, lab) for s, lab, *_ in calib], delta, epsilon, points="cue+answer")
        losses = [trajectory_loss(s, lab, rule.threshold) for s, lab, *_ in test]
        realized.append(np.mean(losses))
        exits += not rule.never_exit
    assert exits > 50  # the rule does exit: the check is not vacuous
    assert np.mean(realized) <= delta
    assert np.mean(np.array(realized) > delta + 0.02) <= epsilon


def test_give_up_calibration_bounds_giving_up_on_traces_that_end_right():
    rng = np.random.default_rng(2)
    delta = 0.1
    data = many_checks(rng, 1200)
    realized, given = [], 0
    for _ in range(60):
        order = rng.permutation(len(data))
        calib, test = [data[i] for i in order[:600]], [data[i] for i in order[600:]]
        rule = calibrate_give_up(
            [(s, t, ok) for s, _, t, ok, _ in calib], delta, 0.1, min_tokens=250, points="cue+answer"
        )
        realized.append(
            np.mean([give_up_loss(s, t, ok, rule.threshold, rule.min_tokens) for s, _, t, ok, _ in test])
        )
        given += not rule.never
    assert given > 30 and np.mean(realized) <= delta
    never = GiveUpThreshold(0.1, 0.1, 0.0, 0, 10, 0.0)
    assert never.never and not never.should_give_up(0.0, 1000)
    assert GiveUpThreshold.from_dict(never.to_dict()) == never


def test_a_give_up_forces_the_answer_and_says_so(monkeypatch):
    """A scripted model writes four paragraph ends; the probe scores every point 0.5, below the give-up
    threshold, and never reaches the exit threshold: LYNX gives up at the first point from `min_tokens` on,
    and the answer is forced through the same cache as an exit's."""
    lm = family_lm("deepseek-r1")
    written = "3 + 4 = 7.\n\nWe add.\n\nStill 7.\n\nYes 7.\n\nok</think> done"
    ids = lm.encode(written)
    points = [i for i in range(len(ids)) if lm.tokenizer.decode(ids[: i + 1]).endswith("\n\n")]
    min_tokens = points[1] + 1  # the third paragraph end is the first one this late
    probe = Probe(lm.feature_spec().feature_dim, kinds=("paragraph",))
    torch.nn.init.zeros_(probe.net[4].weight)
    torch.nn.init.zeros_(probe.net[4].bias)  # P(safe) = 0.5 everywhere
    give_up = GiveUpThreshold(0.1, 0.1, 0.6, min_tokens, 100, 0.0, points="paragraph")
    bundle = bundle_of(probe, lm, give_up=give_up)
    policy = LynxPolicy(
        bundle=bundle, delta=0.1, mode="trajectory", decision_points=("paragraph",), give_up_delta=0.1
    )
    steps, result = run_scripted(monkeypatch, lm, written, policy=policy)
    assert result.finish_reason == "exit" and result.gave_up and result.exit_point == "paragraph"
    assert result.exit_index == points[2]
    exited = [s for s in steps if s.exit]
    assert len(exited) == 1 and exited[0].gave_up and exited[0].score == pytest.approx(0.5)
    assert result.text.endswith("7}") and "Final Answer: \\boxed{" in result.text
    assert policy.scores == [pytest.approx(0.5)] * 3
    # without a give-up the same trace thinks to its end
    policy = LynxPolicy(bundle=bundle, delta=0.1, mode="trajectory", decision_points=("paragraph",))
    _, result = run_scripted(monkeypatch, lm, written, policy=policy)
    assert result.exit_index is None and not result.gave_up
    assert (
        policy.observe(
            Step(
                0,
                0,
                0,
                "",
                "think",
                point="paragraph",
                features=torch.zeros(lm.feature_spec().feature_dim),
                score=0.99,
            )
        )
        is Decision.CONTINUE
    )  # below the exit threshold (inf): continue


def test_eval_sweeps_decision_points_and_give_up_as_curves_of_their_own():
    settings = parse_methods(
        ["never", "lynx-harm"],
        {"delta": "0.1,0.2"},
        axes={"decision_points": [("cue",), ("cue", "answer")], "give_up_delta": [None, 0.05]},
    )
    labels = [s.label for s in settings]
    assert labels == [
        "never",
        "lynx-harm@0.1",
        "lynx-harm@0.2",
        "lynx-harm[give-up 0.05]@0.1",
        "lynx-harm[give-up 0.05]@0.2",
        "lynx-harm[cue+answer]@0.1",
        "lynx-harm[cue+answer]@0.2",
        "lynx-harm[cue+answer, give-up 0.05]@0.1",
        "lynx-harm[cue+answer, give-up 0.05]@0.2",
    ]
    assert dict(settings[-1].options) == {
        "delta": 0.2,
        "decision_points": ("cue", "answer"),
        "give_up_delta": 0.05,
    }


def test_the_vectorized_trajectory_losses_equal_the_rule_applied_one_rollout_at_a_time():
    rng = np.random.default_rng(3)
    grid = [*np.linspace(0.0, 1.0, 201)[1:], 0.37]
    for _ in range(200):
        m = int(rng.integers(0, 12))
        probs, labels = (
            list(np.round(rng.random(m), 2)),
            [int(x) for x in rng.integers(0, 2, m)],
        )  # rounded: ties
        assert list(trajectory_losses([(probs, labels)], grid)) == [
            trajectory_loss(probs, labels, t) for t in grid
        ]


def test_the_risk_margin_widens_for_events_clustered_in_rollouts():
    from lynx_exit.cli.probe import sampling_margin
    from lynx_exit.probe.calibration import clustered_se

    spread = np.tile([True, False, False, False, False], 40)  # 200 events, 40 rollouts with one hit each
    lumped = np.repeat([True, False, False, False, False], 40)  # the same 40 hits, all in 8 rollouts
    rollouts = np.repeat(np.arange(40), 5)
    assert clustered_se(spread, rollouts, 0.2) == pytest.approx(0.0)
    assert clustered_se(lumped, rollouts, 0.2) > math.sqrt(0.2 * 0.8 / 200)  # a design effect above 1
    row = {"mode": "event", "n": 200, "delta": 0.2, "rate": 0.2, "n_calibration": 200}
    plain = sampling_margin({**row, "cluster_se": 0.0})
    assert plain == pytest.approx(1.96 * math.sqrt(2 * 0.2 * 0.8 / 200))  # test and calibration sampling
    assert sampling_margin({**row, "cluster_se": clustered_se(lumped, rollouts, 0.2)}) > plain
    assert sampling_margin({**row, "mode": "harm"}) == pytest.approx(1.96 * math.sqrt(0.2 * 0.8 / 200))
