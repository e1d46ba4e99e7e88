"""Reasoning traces for the reference models to learn.

`make_trace` is the generator of the model shipped until now: steps, "So the answer is N.", then
re-checks that never change anything (its first stated answer is always final). `generate_trace`
is the generator calibrated to measured traces of real reasoning models (see its docstring).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from lynx_exit.reference.problems import WordProblem, apply_op, describe_op


def _wrong_value(rng: random.Random, right: int) -> int:
    wrong = right + rng.choice([-2, -1, 1, 2, 10, -10])
    return wrong if wrong >= 0 and wrong != right else right + 1


def _step_lines(
    problem: WordProblem,
    rng: random.Random,
    i: int,
    values: list[int],
    cue_rate: float,
    slip_rate: float,
    may_slip: bool = True,
) -> list[str]:
    """Step i of the chain: maybe a cue before it, the step, a slip caught at once, the running value."""
    op, b = problem.ops[i]
    before, after = values[i], values[i + 1]
    lines = []
    if i > 0 and rng.random() < cue_rate:
        lines.append(rng.choice(["Hmm, next step.", "Hmm, what comes next?", "Wait, there is more."]))
    lead = f"Step {i + 1}: {problem.name} {describe_op(op, b, rng.randrange(3))}, so {before} {op} {b}"
    if may_slip and rng.random() < slip_rate:
        caught = _wrong_value(rng, after)
        lines += [f"{lead} = {caught}.", f"Wait, {before} {op} {b} is not {caught}. It is {after}."]
    else:
        lines.append(f"{lead} = {after}.")
    lines.append(f"Now {problem.name} has {after} {problem.obj}.")
    return lines


def make_trace(problem: WordProblem, rng: random.Random, mistake_rate: float = 0.15) -> str:
    """A thinking trace with steps, mid-trace cues, self-corrections and re-checks, then the answer."""
    lines = [f"{problem.name} starts with {problem.start} {problem.obj}."]
    values = problem.values
    for i in range(len(problem.ops)):
        lines += _step_lines(problem, rng, i, values, cue_rate=0.35, slip_rate=mistake_rate)
    lines.append(f"So the answer is {problem.answer}.")
    # Overthinking: 0–9 redundant re-checks (mean ≈ 4) after the answer is already known.
    for _ in range(rng.choice([0, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9])):
        lines.append(_confirmation(problem, rng, values, problem.answer))
    return "\n".join(lines) + f"\n</think> Final Answer: \\boxed{{{problem.answer}}}"


# -- the calibrated generator ------------------------------------------------------------------------------
# Sources (the papers each rate is read from): FTM = "First Try Matters", arXiv 2510.08308; DEER = arXiv
# 2504.15895; 2412.21187 = "Do NOT think that much for 2+3=?"; 2501.18585 = "Thoughts are all over the place";
# 2603.15500 = wait-token counts by model size.


@dataclass(frozen=True)
class TracePreset:
    """Every rate of the generator, each from the literature; none is tuned toward any exit method's
    result."""

    name: str
    # P(the first stated answer is wrong), by the number of steps: an arithmetic slip that is not caught
    # at once. FTM Table 5: first-candidate accuracy is 1.4-5.6 points below final; small models err more on
    # longer chains.
    first_wrong_by_steps: dict[int, float]
    # Of traces whose first answer is wrong, P(a re-check corrects it) and P(it turns into another wrong
    # answer); of traces whose first answer is right, P(a re-check spoils it). Chosen so that final != first
    # in ~8 % of finished traces (3-10 % on MATH-500) split wrong->right 65 %, wrong->other 20 %, right->wrong
    # 15 % (FTM Tables 4-5 and Fig. 3/11, bounds derived in the notes). Every change happens in a
    # re-derivation from the start (below), whose arithmetic decides it: the trace shows why the answer
    # changes.
    fix_given_wrong: float
    other_given_wrong: float
    spoil_given_right: float
    # P(the trace loops until the budget without ending), by the number of steps, as sampled at T=0.6:
    # ~15 % of MATH-500-like traces for a 1.5B distill, ~7 % for the 7B, most on the hardest problems (DEER
    # Table 5 means, derived). The traces are written with `trained_runaway`, the rate that samples at this
    # one (see there).
    runaway_by_steps: dict[int, float]
    runaway_after_candidate: float = (
        0.5  # share of loops that start after a candidate answer (assumption in the notes)
    )
    # Re-checks after the first answer: 2.5-7 candidates per rollout (FTM Table 4), 3-4.5 rounds (2412.21187).
    rechecks: tuple[int, ...] = (0, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6)
    slip_caught_rate: float = 0.12  # per step: a slip fixed at once ("Wait, ... is not X. It is Y.")
    step_cue_rate: float = (
        0.35  # "Hmm, next step." between steps: cues come before the answer too (FTM Fig. 1)
    )
    # A gap between the answer being computed and being stated (2412.21187: the first correct answer ends at
    # 43-56 % of the tokens; FTM: the first candidate at 0.5-0.75 of the trace).
    hesitation_rate: float = 0.5
    # Wrong traces switch thoughts far more (2501.18585: +418 %): extra cues while the answer held is wrong.
    extra_doubt_if_wrong: float = 0.6
    # a loop is written this long (~600 tokens: past the 500-token budgets it runs with), never ending
    runaway_chars: int = 1300
    # P(one re-check re-derives the whole chain from the start). An assumption (FTM: most reflections
    # re-derive or re-verify the candidate); it must be >= the change rates above, which happen only in such a
    # re-derivation.
    rederive_rate: float = 0.5
    sampling_temperature: float = 0.6  # the temperature the rates above are measured at (FTM, DEER: T=0.6)

    def __post_init__(self) -> None:
        for change in (self.fix_given_wrong + self.other_given_wrong, self.spoil_given_right):
            if change > self.rederive_rate:
                raise ValueError(
                    f"{self.name}: a change rate {change} exceeds rederive_rate {self.rederive_rate}"
                )

    def trained_runaway(self, steps: int) -> float:
        """The share of loops to write so that a model sampled at `sampling_temperature` loops at the
        literature's rate: a branch learned with probability p is sampled with p^(1/T) / (p^(1/T) +
        (1-p)^(1/T)), so a rare branch written at the sampled rate all but vanishes at T=0.6 (measured: 3 %
        sampled from 13 % written). Solving for p gives q^T / (q^T + (1-q)^T) for a sampled rate q."""
        q, t = self.runaway_by_steps[steps], self.sampling_temperature
        return q**t / (q**t + (1 - q) ** t)


SMALL = TracePreset(
    name="reference",
    first_wrong_by_steps={2: 0.05, 3: 0.09, 4: 0.14, 5: 0.19, 6: 0.25},
    fix_given_wrong=0.35,
    other_given_wrong=0.11,
    spoil_given_right=0.014,
    runaway_by_steps={2: 0.03, 3: 0.07, 4: 0.13, 5: 0.22, 6: 0.32},
)
LARGE = TracePreset(
    name="reference-large",
    # A 7B-like model: fewer first-try errors, fewer and mostly corrective changes (FTM: Qwen3-8B and R1-0528
    # change the answer in 1.6-2.4 % of reflections against 12.4 % for R1-Distill-Qwen-7B), half the loops.
    first_wrong_by_steps={2: 0.02, 3: 0.04, 4: 0.06, 5: 0.08, 6: 0.11},
    fix_given_wrong=0.45,
    other_given_wrong=0.05,
    spoil_given_right=0.007,
    runaway_by_steps={2: 0.01, 3: 0.03, 4: 0.06, 5: 0.10, 6: 0.16},
    rechecks=(0, 1, 1, 1, 2, 2, 2, 3, 3, 4),
)
PRESETS = {preset.name: preset for preset in (SMALL, LARGE)}

ANSWER_SENTENCE = "So the answer is {}."


@dataclass
class Trace:
    text: str
    first_answer: int | None  # the first stated answer (None: the trace loops before stating one)
    final_answer: int | None  # what the trace ends with (None: a runaway, which never ends)
    runaway: bool
    revisions: list[tuple[int, int]] = field(default_factory=list)  # (from, to) of each changed answer
    cue_count_before_first: int = 0
    cue_count_after_first: int = 0


_CUE = re.compile(r"\b(?:wait|hmm|alternatively)\b", re.IGNORECASE)


def _recompute(problem: WordProblem, start_step: int, value: int) -> list[int]:
    """Running values from step `start_step` on, starting from `value` after that step."""
    values = [value]
    for op, b in problem.ops[start_step + 1 :]:
        values.append(apply_op(values[-1], op, b))
    return values


def generate_trace(problem: WordProblem, rng: random.Random, preset: TracePreset = SMALL) -> Trace:
    """A thinking trace whose behaviour follows `preset`'s rates (all from measured reasoning traces).

    Structure: the steps, with cues between them and slips caught at once; maybe an uncaught slip that
    carries into the first stated answer; hesitation between computing the answer and stating it; re-checks
    that mostly confirm and sometimes revise (wrong->right, wrong->other wrong, right->wrong); or a loop of
    re-checks or of a step that never ends (before or after a candidate answer).
    """
    steps = len(problem.ops)
    lines: list[str] = [f"{problem.name} starts with {problem.start} {problem.obj}."]
    first_wrong = rng.random() < preset.first_wrong_by_steps[steps]
    runaway = rng.random() < preset.trained_runaway(steps)
    loop_after_candidate = runaway and rng.random() < preset.runaway_after_candidate
    slip_step = rng.randrange(steps) if first_wrong else -1
    values = list(problem.values)
    if first_wrong:  # the slip carries through every later step
        values[slip_step + 1] = _wrong_value(rng, values[slip_step + 1])
        values[slip_step + 1 :] = _recompute(problem, slip_step, values[slip_step + 1])
    loop_step = rng.randrange(steps) if runaway and not loop_after_candidate else -1
    for i, (op, b) in enumerate(problem.ops):
        lines += _step_lines(
            problem, rng, i, values, preset.step_cue_rate, preset.slip_caught_rate, may_slip=i != slip_step
        )
        if i == loop_step:  # a loop before any answer: the same step redone forever
            before, after = values[i], values[i + 1]
            return _loop(
                lines, [f"Wait, let me redo step {i + 1}: {before} {op} {b} = {after}."], preset, None
            )
    held = values[-1]
    doubtful = held != problem.answer
    if rng.random() < preset.hesitation_rate:
        lines.append(
            rng.choice(
                [
                    "Hmm, did I use every step?",
                    "Hmm, let me make sure I read the question right.",
                    f"Wait, the question asks how many {problem.obj} {problem.name} has now.",
                ]
            )
        )
    if doubtful and rng.random() < preset.extra_doubt_if_wrong:
        lines.append(
            rng.choice(
                [
                    "Hmm, I am not sure about this.",
                    "Hmm, that number feels off.",
                    "Alternatively, I could have slipped somewhere.",
                ]
            )
        )
    before_first = _count_cues(lines)
    lines.append(ANSWER_SENTENCE.format(held))
    first = held
    if loop_after_candidate:  # a loop that re-checks a step it does not catch (never the slipped one)
        k = rng.choice([j for j in range(steps) if j != slip_step])
        op, b = problem.ops[k]
        return _loop(
            lines,
            [
                f"Wait, let me check step {k + 1}: {values[k]} {op} {b} = {values[k + 1]}.",
                f"Hmm, let me check the answer {held} again.",
            ],
            preset,
            first,
            before_first,
        )
    # Whether one re-check re-derives the chain from the start, and what that re-derivation finds (FTM: over
    # 90 % of reflections confirm): in a wrong chain it fixes the slip, slips elsewhere or repeats the
    # slip; in a right chain it repeats it or slips (reflection hurting).
    rederive = rng.random() < preset.rederive_rate
    change = "same"
    if rederive:
        draw = rng.random() * preset.rederive_rate
        if doubtful:
            change = (
                "fix"
                if draw < preset.fix_given_wrong
                else "other"
                if draw < preset.fix_given_wrong + preset.other_given_wrong
                else "same"
            )
        elif draw < preset.spoil_given_right:
            change = "spoil"
    rechecks = rng.choice(preset.rechecks) + (1 if doubtful else 0)
    if rederive:
        rechecks = max(rechecks, 1)
    rederive_at = rng.randrange(rechecks) if rederive else -1
    revisions: list[tuple[int, int]] = []
    bad_step = slip_step  # the step whose written value is wrong (-1: none)
    for r in range(rechecks):
        if r == rederive_at:
            values, text, bad_step = _rederivation(problem, rng, values, slip_step, change)
            if values[-1] != held:
                revisions.append((held, values[-1]))
                held = values[-1]
                lines += [text, ANSWER_SENTENCE.format(held)]
            else:
                lines.append(f"{text} Same answer, {held}.")
        else:  # no confirmation recomputes a step written wrong (it would catch it)
            lines.append(_confirmation(problem, rng, values, held, avoid=bad_step))
    lines.append(f"</think> Final Answer: \\boxed{{{held}}}")
    text = "\n".join(lines)
    return Trace(text, first, held, False, revisions, before_first, _count_cues(lines) - before_first)


def _count_cues(lines: list[str]) -> int:
    return sum(len(_CUE.findall(line)) for line in lines)


def _loop(
    lines: list[str], segment: list[str], preset: TracePreset, first: int | None, before_first: int = 0
) -> Trace:
    """Repeat `segment` until the trace is `runaway_chars` long: no end of thinking, no answer."""
    body = "\n".join(lines)
    while len(body) < preset.runaway_chars:
        body += "\n" + "\n".join(segment)
    cues = len(_CUE.findall(body))
    if first is None:
        return Trace(body, None, None, True, [], cues, 0)
    return Trace(body, first, None, True, [], before_first, cues - before_first)


def _confirmation(
    problem: WordProblem, rng: random.Random, values: list[int], held: int, avoid: int = -1
) -> str:
    """A re-check that confirms: a step recomputed (never step `avoid`, whose written value is wrong and would
    be caught) or the whole chain restated."""
    kind = rng.randrange(3)
    if kind == 2 and len(problem.ops) > 1:
        return f"Alternatively, let me redo it from the start: {problem.start} gives {held} again."
    k = rng.choice([j for j in range(len(problem.ops)) if j != avoid])
    op, b = problem.ops[k]
    cue = "Wait" if kind == 0 else "Hmm"
    return f"{cue}, let me check step {k + 1}: {values[k]} {op} {b} = {values[k + 1]}. Yes, that is right."


def _rederivation(
    problem: WordProblem, rng: random.Random, values: list[int], slip_step: int, change: str
) -> tuple[list[int], str, int]:
    """A re-check that works the whole chain out again: the running values it leaves, its sentence, and the
    step it leaves written wrong (-1: none).

    Each step is computed afresh, so whether the answer changes is decided by the arithmetic on the page,
    not by a scripted choice of words: "fix" gets the slipped step right and every later one with it; "same"
    repeats the chain (a right one, or a wrong one's own slip: the model makes the same mistake twice);
    "other" slips again at the slipped step, to a third answer; "spoil" slips in a right chain (what FTM calls
    reflection hurting). A sampling model thus revises when it re-derives correctly what it first got
    wrong."""
    right = problem.values
    if change == "fix":
        redone, bad = list(right), -1
    elif change == "same":
        redone, bad = list(values), slip_step
    else:
        bad = slip_step if change == "other" else rng.randrange(len(problem.ops))
        new = _wrong_value(rng, right[bad + 1])
        while new == values[bad + 1]:
            new += 1
        redone = right[: bad + 1] + _recompute(problem, bad, new)
    steps = ", ".join(f"{redone[j]} {op} {b} = {redone[j + 1]}" for j, (op, b) in enumerate(problem.ops))
    return redone, f"Hmm, let me work it out again from the start: {steps}.", bad
