"""The calibrated trace generator: on 20,000 traces per preset its rates match its parameters within sampling
error, and each trace says what its text says (first and final answers, loops, revisions)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from lynx_exit.reference import LARGE, SMALL, generate_trace, make_problems
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
    expected = sum(preset.runaway_by_steps[len(p.ops)] for p in problems) / N
    assert within(sum(t.runaway for t in traces), N, expected)
    runaways = [t for t in traces if t.runaway]
    assert within(sum(t.first_answer is not None for t in runaways), len(runaways), preset.runaway_after_candidate)
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
    direction = Counter("w->r" if t.final_answer == p.answer else "r->w" if t.first_answer == p.answer else "w->w"
                        for t, p in changed)
    assert direction.most_common(1)[0][0] == "w->r" and direction["r->w"] > 0
    assert 0.08 <= sum(t.runaway for t in traces) / N <= 0.25
    cues_before = sum(t.cue_count_before_first for t in traces)
    assert cues_before / (cues_before + sum(t.cue_count_after_first for t in traces)) >= 0.2
    positions = [t.text.index("So the answer is") / len(t.text.split("</think>")[0]) for t in traces if t.first_answer is not None]
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
    assert sum(t.runaway for t in large) <= 0.5 * sum(t.runaway for t in small) * 1.1
