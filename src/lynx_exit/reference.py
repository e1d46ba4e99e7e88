"""The shipped reference reasoning model: synthetic word problems, traces that overthink, training.

Traces have the structure LYNX exploits (issue: reference model): arithmetic steps, cue words
at natural places, genuine self-corrections after "Wait" (exiting before the fix is wrong),
and a variable number of redundant re-checks after the answer is known (what early exit cuts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lynx_exit.tasks import REASONING_SUFFIX, Problem

logger = logging.getLogger(__name__)

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
        choices = (["+"] if value <= 48 else []) + (["-"] if value >= 2 else []) + (["*"] if value <= 20 else [])
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
    return [Problem("arith", f"arith-{split}-{i}", p.question(), str(p.answer)) for i, p in enumerate(problems)]


def _wrong_value(rng: random.Random, right: int) -> int:
    wrong = right + rng.choice([-2, -1, 1, 2, 10, -10])
    return wrong if wrong >= 0 and wrong != right else right + 1


def make_trace(problem: WordProblem, rng: random.Random, mistake_rate: float = 0.15) -> str:
    """A thinking trace with steps, mid-trace cues, self-corrections and re-checks, then the answer."""
    lines = [f"{problem.name} starts with {problem.start} {problem.obj}."]
    values = problem.values
    for i, (op, b) in enumerate(problem.ops):
        before, after = values[i], values[i + 1]
        if i > 0 and rng.random() < 0.35:
            lines.append(rng.choice(["Hmm, next step.", "Hmm, what comes next?", "Wait, there is more."]))
        lead = f"Step {i + 1}: {problem.name} {describe_op(op, b, rng.randrange(3))}, so {before} {op} {b}"
        if rng.random() < mistake_rate:
            wrong = _wrong_value(rng, after)
            lines.append(f"{lead} = {wrong}.")
            lines.append(f"Wait, {before} {op} {b} is not {wrong}. It is {after}.")
        else:
            lines.append(f"{lead} = {after}.")
        lines.append(f"Now {problem.name} has {after} {problem.obj}.")
    lines.append(f"So the answer is {problem.answer}.")
    # Overthinking: 0–9 redundant re-checks (mean ≈ 4) after the answer is already known.
    for _ in range(rng.choice([0, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9])):
        kind = rng.randrange(3)
        if kind == 2 and len(problem.ops) > 1:
            lines.append(f"Alternatively, let me redo it from the start: {problem.start} gives {problem.answer} again.")
        else:
            k = rng.randrange(len(problem.ops))
            op, b = problem.ops[k]
            cue = "Wait" if kind == 0 else "Hmm"
            lines.append(f"{cue}, let me check step {k + 1}: {values[k]} {op} {b} = {values[k + 1]}. Yes, that is right.")
    return "\n".join(lines) + f"\n</think> Final Answer: \\boxed{{{problem.answer}}}"


@dataclass(frozen=True)
class ReferenceTrainConfig:
    steps: int = 1600
    batch_size: int = 16
    learning_rate: float = 3e-3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 640
    num_train_problems: int = 20000
    seed: int = 0
    init_from: str | None = None  # continue training this checkpoint (its tokenizer is kept)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "num_train_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


def build_corpus(problems: list[WordProblem], seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(p.question() + REASONING_SUFFIX, make_trace(p, rng)) for p in problems]


def train_reference_model(config: ReferenceTrainConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Train the reference model (from scratch, or on from `init_from`) and `save_pretrained` it to `out_dir`."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lynx_exit.tokenizer import train_tokenizer

    torch.manual_seed(config.seed)
    problems = make_problems("train", config.num_train_problems)
    corpus = build_corpus(problems, seed=config.seed)
    if config.init_from:
        tokenizer = AutoTokenizer.from_pretrained(config.init_from)
        previous = json.loads((Path(config.init_from) / "training.json").read_text())
    else:
        tokenizer = train_tokenizer((q + "\n" + t for q, t in corpus[:5000]), vocab_size=config.vocab_size)
        previous = None
    examples = []
    for question, trace in corpus:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
        target = tokenizer(trace, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt, target))
    mean_trace = sum(len(t) for _, t in examples) / len(examples)
    logger.info("corpus: %d examples, mean trace %.1f tokens", len(examples), mean_trace)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM.from_pretrained(config.init_from) if config.init_from else LlamaForCausalLM(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    started = time.perf_counter()
    losses = []
    bar = tqdm(range(config.steps), desc="train-reference", disable=not progress)
    for _ in bar:
        picks = torch.randint(len(examples), (config.batch_size,), generator=generator).tolist()
        batch = [examples[i] for i in picks]
        width = max(len(p) + len(t) for p, t in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt, target) in enumerate(batch):
            ids = prompt + target
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, len(prompt) : len(ids)] = torch.tensor(target)
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.perf_counter() - started, 1),
        "final_loss": sum(losses[-50:]) / min(50, len(losses)),
        "mean_trace_tokens": round(mean_trace, 1),
        "split_seeds": SPLIT_SEEDS,
        "torch": torch.__version__,
        "continued_from": previous,
    }
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    if not math.isfinite(report["final_loss"]):
        raise RuntimeError("reference model training diverged (non-finite loss)")
    return report
