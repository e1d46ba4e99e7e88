"""Training the reference reasoning models: small Llama models trained from scratch on the traces of
`traces.generate_trace` (a preset per model, one tokenizer for both), in length-grouped batches.

What a model then does when sampled (how often it slips, revises or loops) is measured, not assumed:
`benchmarks/reference_model.py`."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lynx_exit.reference.problems import SPLIT_SEEDS, WordProblem, make_problems
from lynx_exit.reference.traces import PRESETS, generate_trace, make_trace
from lynx_exit.tasks import REASONING_SUFFIX

logger = logging.getLogger(__name__)


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
    tokenizer_from: str | None = None  # start from scratch with this model folder's tokenizer (to share it)
    # The traces: a calibrated preset of `traces.PRESETS` ("reference", "reference-large"; one shared
    # tokenizer) or "v1" (the first reference model's generator, whose first answer is always final).
    preset: str = "reference"

    def __post_init__(self) -> None:
        if self.preset not in ("v1", *PRESETS):
            raise ValueError(f"preset must be one of v1, {', '.join(PRESETS)}, got {self.preset!r}")
        for name in (
            "steps",
            "batch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "num_train_problems",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.init_from and self.tokenizer_from:
            raise ValueError(
                "init_from keeps that checkpoint's tokenizer; tokenizer_from is for training from scratch"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


GROUP = 8  # batches drawn at once and grouped by length

# Model sizes of the presets: the large one has >= 3x the parameters of the small one (issue: reference pair).
PRESET_SIZES: dict[str, dict[str, int]] = {
    "reference": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384},
    "reference-large": {"hidden_size": 192, "num_layers": 6, "num_heads": 6, "intermediate_size": 576},
}


def build_corpus(problems: list[WordProblem], seed: int, preset: str = "v1") -> list[tuple[str, str, bool]]:
    """(question, trace, ends) per problem; a runaway trace does not end (no end-of-sequence is learned after
    it)."""
    rng = random.Random(seed)
    if preset == "v1":
        return [(p.question() + REASONING_SUFFIX, make_trace(p, rng), True) for p in problems]
    out = []
    for problem in problems:
        trace = generate_trace(problem, rng, PRESETS[preset])
        out.append((problem.question() + REASONING_SUFFIX, trace.text, not trace.runaway))
    return out


def shared_tokenizer(vocab_size: int) -> Any:
    """The one tokenizer of the calibrated presets: trained on a fixed corpus, so both models get the same
    one."""
    from lynx_exit.reference.tokenizer import train_tokenizer

    corpus = build_corpus(make_problems("train", 5000), seed=0, preset="reference")
    return train_tokenizer((q + "\n" + t for q, t, _ in corpus), vocab_size=vocab_size)


def train_reference_model(
    config: ReferenceTrainConfig, out_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Train the reference model (from scratch, or on from `init_from`) and `save_pretrained` it to
    `out_dir`."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lynx_exit.reference.tokenizer import train_tokenizer

    torch.manual_seed(config.seed)
    problems = make_problems("train", config.num_train_problems)
    corpus = build_corpus(problems, seed=config.seed, preset=config.preset)
    previous = None
    if config.init_from:
        tokenizer = AutoTokenizer.from_pretrained(config.init_from)
        previous = json.loads((Path(config.init_from) / "training.json").read_text())
    elif config.tokenizer_from:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_from)
    elif config.preset == "v1":
        tokenizer = train_tokenizer((q + "\n" + t for q, t, _ in corpus[:5000]), vocab_size=config.vocab_size)
    else:
        tokenizer = shared_tokenizer(config.vocab_size)
    examples = []
    for question, trace, ends in corpus:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
        target = tokenizer(trace, add_special_tokens=False)["input_ids"] + (
            [tokenizer.eos_token_id] if ends else []
        )
        examples.append((prompt, target[: 1024 - len(prompt)]))  # a loop is cut at the context
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
    model = (
        LlamaForCausalLM.from_pretrained(config.init_from)
        if config.init_from
        else LlamaForCausalLM(model_config)
    )
    model.config.lynx_step_separator = (
        "\n"  # the traces write one reasoning step a line: a line ends a paragraph
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    started = time.perf_counter()
    losses = []
    bar = tqdm(range(config.steps), desc="train-reference", disable=not progress)
    queue: list[list[int]] = []
    for _ in bar:
        if not queue:  # length-grouped batches (as transformers' group_by_length): 8 random batches' worth of
            # examples, sorted by length and cut into batches, so a loop of ~600 tokens pads few short traces
            picks = torch.randint(len(examples), (config.batch_size * GROUP,), generator=generator).tolist()
            picks.sort(key=lambda i: len(examples[i][0]) + len(examples[i][1]))
            queue = [picks[j : j + config.batch_size] for j in range(0, len(picks), config.batch_size)]
            order = torch.randperm(len(queue), generator=generator).tolist()
            queue = [queue[j] for j in order]
        batch = [examples[i] for i in queue.pop()]
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
