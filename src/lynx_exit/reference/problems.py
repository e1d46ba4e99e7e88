"""The reference model's synthetic word problems: 2–6 steps of +, −, ×2, ×3 on small numbers, in three
disjoint splits (by a hash of the problem)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from lynx_exit.tasks import Problem

NAMES = ["Tom", "Ana", "Raj", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Ben", "Kim"]
OBJECTS = ["apples", "coins", "books", "cards", "stamps", "pens", "shells", "marbles"]
SPLITS = {"train": range(0, 8), "calib": range(8, 9), "test": range(9, 10)}  # hash buckets of 10
SPLIT_SEEDS = {"train": 1001, "calib": 2002, "test": 3003}

_ADD = ["buys {b} more", "finds {b} more", "gets {b} more from a friend"]
_SUB = ["gives away {b}", "loses {b}", "sells {b}"]
_MUL = {2: "doubles the pile", 3: "triples the pile"}


@dataclass(frozen=True)
class WordProblem:
    name: str
    obj: str
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+", 3), ("-", 2), ("*", 2)

    @property
    def values(self) -> list[int]:
        """Running value after the start and after each step."""
        out = [self.start]
        for op, b in self.ops:
            out.append(apply_op(out[-1], op, b))
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    def question(self) -> str:
        parts = [f"{self.name} has {self.start} {self.obj}."]
        for op, b in self.ops:
            parts.append(f"Then {self.name} {describe_op(op, b)}.")
        parts.append(f"How many {self.obj} does {self.name} have now?")
        return " ".join(parts)

    def key(self) -> str:
        return f"{self.start}|{self.ops}"


def apply_op(value: int, op: str, b: int) -> int:
    return value + b if op == "+" else value - b if op == "-" else value * b


def describe_op(op: str, b: int, variant: int = 0) -> str:
    if op == "+":
        return _ADD[variant % len(_ADD)].format(b=b)
    if op == "-":
        return _SUB[variant % len(_SUB)].format(b=b)
    return _MUL[b]


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10


def sample_problem(rng: random.Random) -> WordProblem:
    """2–6 steps on small numbers (operands ≤ 12, values ≤ 60) so a ~1M-parameter model can learn them."""
    steps = rng.randint(2, 6)
    value = rng.randint(2, 15)
    start, ops = value, []
    for _ in range(steps):
        choices = (
            (["+"] if value <= 48 else []) + (["-"] if value >= 2 else []) + (["*"] if value <= 20 else [])
        )
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(1, min(12, 60 - value))
        elif op == "-":
            b = rng.randint(1, min(12, value - 1))
        else:
            b = 3 if value <= 12 and rng.random() < 0.4 else 2
        ops.append((op, b))
        value = apply_op(value, op, b)
    return WordProblem(rng.choice(NAMES), rng.choice(OBJECTS), start, tuple(ops))


def make_problems(split: str, count: int, seed: int | None = None) -> list[WordProblem]:
    """`count` distinct problems of `split`; splits are disjoint by a hash of the problem."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    seen: set[str] = set()
    problems: list[WordProblem] = []
    while len(problems) < count:
        problem = sample_problem(rng)
        if _bucket(problem.key()) in SPLITS[split] and problem.key() not in seen:
            seen.add(problem.key())
            problems.append(problem)
    return problems


def as_task_problems(problems: list[WordProblem], split: str) -> list[Problem]:
    return [
        Problem("arith", f"arith-{split}-{i}", p.question(), str(p.answer)) for i, p in enumerate(problems)
    ]
