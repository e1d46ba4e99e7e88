"""The calibrated trace generator: on 20,000 traces per preset its rates match its parameters within sampling
error, and each trace says what its text says (first and final answers, loops, revisions)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from lynx_exit.reference import LARGE, SMALL, apply_op, generate_trace, make_problems
from lynx_exit.tasks.grading import extract_boxed

N = 20_000
ANSWER = re.compile(r"So the answer is (-?\d+)\.")


@pytest.fixture(scope="module")
def problems():
    return make_problems("train", N)


@pytest.fixture(scope="module", params=[SMALL, LARGE], ids=lambda p: p.name)
def sample(request, problems):
    rng = random.Random(7)
    return request.param, [generate_trace(p, rng, request.param) for p in problems]


def within(observed: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(observed / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


def test_each_trace_says_what_its_text_says(sample):
    _, traces = sample
    for trace in traces:
        stated = [int(x) for x in ANSWER.findall(trace.text)]
        if trace.first_answer is None:
            assert not stated and trace.runaway
        else:
            assert stated[0] == trace.first_answer
        if trace.runaway:
            assert "</think>" not in trace.text and trace.final_answer is None
        else:
            assert extract_boxed(trace.text) == str(trace.final_answer) == str(stated[-1])
            distinct = [a for i, a in enumerate(stated) if i == 0 or a != stated[i - 1]]
            assert distinct == [trace.first_answer] + [to for _, to in trace.revisions]
        if not trace.runaway and trace.final_answer != trace.first_answer:
            assert trace.revisions and trace.revisions[-1][1] == trace.final_answer


def test_runaway_share_matches_the_preset(sample, problems):
    preset, traces = sample
    expected = sum(preset.trained_runaway(len(p.ops)) for p in problems) / N
    assert within(sum(t.runaway for t in traces), N, expected)
    runaways = [t for t in traces if t.runaway]
    assert within(
        sum(t.first_answer is not None for t in runaways), len(runaways), preset.runaway_after_candidate
    )
    by_steps = Counter(len(p.ops) for p, t in zip(problems, traces, strict=True) if t.runaway)
    assert by_steps[6] > by_steps[2] * 3  # loops concentrate on the hardest problems


def test_first_answer_errors_and_their_revisions_match_the_preset(sample, problems):
    preset, traces = sample
    finished = [(t, p) for t, p in zip(traces, problems, strict=True) if not t.runaway]
    wrong_first = [(t, p) for t, p in finished if t.first_answer != p.answer]
    expected_wrong = sum(preset.first_wrong_by_steps[len(p.ops)] for _, p in finished) / len(finished)
    assert within(len(wrong_first), len(finished), expected_wrong)
    fixed = sum(t.final_answer == p.answer for t, p in wrong_first)
    other = sum(t.final_answer not in (p.answer, t.first_answer) for t, p in wrong_first)
    assert within(fixed, len(wrong_first), preset.fix_given_wrong)
    assert within(other, len(wrong_first), preset.other_given_wrong)
    right_first = [(t, p) for t, p in finished if t.first_answer == p.answer]
    spoiled = sum(t.final_answer != p.answer for t, p in right_first)
    assert within(spoiled, len(right_first), preset.spoil_given_right)


def test_the_small_preset_meets_the_literature_targets(problems):
    rng = random.Random(11)
    traces = [generate_trace(p, rng, SMALL) for p in problems]
    finished = [(t, p) for t, p in zip(traces, problems, strict=True) if not t.runaway]
    changed = [(t, p) for t, p in finished if t.final_answer != t.first_answer]
    share = len(changed) / len(finished)
    assert 0.03 <= share <= 0.12  # final != first in 3-12 % of finished traces (FTM, MATH-500)
    direction = Counter(
        "w->r" if t.final_answer == p.answer else "r->w" if t.first_answer == p.answer else "w->w"
        for t, p in changed
    )
    assert direction.most_common(1)[0][0] == "w->r" and direction["r->w"] > 0
    sampled_runaway = (
        sum(SMALL.runaway_by_steps[len(p.ops)] for p in problems) / N
    )  # the rate to sample at T=0.6
    assert 0.08 <= sampled_runaway <= 0.25 and sum(t.runaway for t in traces) / N > sampled_runaway
    cues_before = sum(t.cue_count_before_first for t in traces)
    assert cues_before / (cues_before + sum(t.cue_count_after_first for t in traces)) >= 0.2
    positions = [
        t.text.index("So the answer is") / len(t.text.split("</think>")[0])
        for t in traces
        if t.first_answer is not None
    ]
    assert 0.45 <= sum(positions) / len(positions) <= 0.8
    # wrong traces doubt more (2501.18585): more cues per trace while the held answer is wrong
    wrong = [t.cue_count_before_first for t, p in finished if t.first_answer != p.answer]
    right = [t.cue_count_before_first for t, p in finished if t.first_answer == p.answer]
    assert sum(wrong) / len(wrong) > 1.2 * sum(right) / len(right)


def test_the_large_preset_errs_and_loops_less():
    problems = make_problems("train", 5000)
    small = [generate_trace(p, random.Random(i), SMALL) for i, p in enumerate(problems)]
    large = [generate_trace(p, random.Random(i), LARGE) for i, p in enumerate(problems)]

    def accuracy(traces):
        return sum(t.final_answer == p.answer for t, p in zip(traces, problems, strict=True)) / len(problems)

    assert accuracy(large) >= accuracy(small) + 0.10

    def sampled_runaway(preset):  # the rate a model trained on the preset's traces is to loop at, at T=0.6
        return sum(preset.runaway_by_steps[len(p.ops)] for p in problems)

    assert sampled_runaway(LARGE) <= 0.5 * sampled_runaway(SMALL)
    assert sum(t.runaway for t in large) < sum(t.runaway for t in small)


STEP = re.compile(r"^Step (\d+): .*, so (-?\d+) ([-+*]) (\d+) = (-?\d+)\.$")
CAUGHT = re.compile(r"^Wait, (-?\d+) ([-+*]) (\d+) is not (-?\d+)\. It is (-?\d+)\.$")
CHECK = re.compile(
    r"^(?:Wait|Hmm), let me check step (\d+): (-?\d+) ([-+*]) (\d+) = (-?\d+)\. Yes, that is right\.$"
)
REDERIVE = re.compile(r"^Hmm, let me work it out again from the start: (.*?)\.( Same answer, (-?\d+)\.)?$")
REDO = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)")


def test_the_answer_changes_exactly_when_a_rederivation_ends_elsewhere(sample):
    """Revisions are decided by the arithmetic on the page: a re-derivation from the start that ends on
    another value states it, one that ends on the held answer says so, and a confirming step check recomputes
    the value written for that step (so a model that re-derives its own slip correctly revises)."""
    _, traces = sample
    checked = rederived = changed = 0
    for trace in traces[:5000]:
        written: dict[int, int] = {}
        lines = trace.text.split("\n")
        held = None
        for line, following in zip(lines, lines[1:] + [""], strict=True):
            if m := ANSWER.fullmatch(line):
                held = int(m[1])
            elif m := STEP.match(line):
                written[int(m[1])] = int(m[5])
            elif m := CAUGHT.match(line):
                written[max(written)] = int(m[5])
            elif m := CHECK.match(line):
                checked += 1
                assert written[int(m[1])] == int(m[5]) == apply_op(int(m[2]), m[3], int(m[4])), line
            elif m := REDERIVE.match(line):
                rederived += 1
                redo = REDO.findall(m[1])
                written = {step: int(r[3]) for step, r in enumerate(redo, start=1)}
                if m[2]:
                    assert int(m[3]) == held == written[len(redo)], line
                else:
                    changed += 1
                    assert (
                        ANSWER.fullmatch(following)
                        and int(ANSWER.fullmatch(following)[1]) == written[len(redo)] != held
                    )
    assert checked > 1000 and rederived > 1000 and changed > 20
