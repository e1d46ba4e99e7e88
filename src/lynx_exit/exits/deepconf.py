"""DeepConf-style online exit ("Deep Think with Confidence"): token confidence over a sliding window.

The confidence of a token is C = −(1/k) Σ_{j≤k} log P(j) over the k most likely tokens where it
was sampled (the engine computes it in its one host sync per step, see `confidence_top_k`); the
group confidence is the mean C of the last `window` tokens. DeepConf stops a trace whose group
confidence drops below a threshold s and discards it; with one trace, its natural form is to end
the thinking there and force the answer. s comes from a warm-up: full traces on warm-up problems,
each trace's lowest group confidence, and s = their (100 − η)-th percentile, where η (`keep`) is
the share of warm-up traces that would never have exited. The warm-up is stored like a probe, in a
folder (`deepconf.json`) bound to the model's tokenizer, and read by `--deepconf DIR`.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lynx_exit.artifacts import FolderLock, command_line, write_json_atomic
from lynx_exit.engine.types import Decision, Step
from lynx_exit.exits.registry import BasePolicy, ExitMethod, Knob, MethodContext, register, window_option

if TYPE_CHECKING:
    from lynx_exit.engine import GenerationConfig
    from lynx_exit.models import LoadedModel
    from lynx_exit.tasks import Problem

WARMUP_FILE = "deepconf.json"
WARMUP_FORMAT = "lynx-exit-deepconf-warmup-v1"


@dataclass
class DeepConfPolicy(BasePolicy):
    """Exit when the mean token confidence of the last `window` thinking tokens falls below `threshold`."""

    threshold: float = 0.0
    window: int = 32
    confidence_top_k: int = 5
    name: str = "deepconf"
    _recent: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.window < 1 or self.confidence_top_k < 1:
            raise ValueError(
                f"deepconf needs window >= 1 and top_k >= 1, got {self.window}, {self.confidence_top_k}"
            )
        self.reset()

    def reset(self) -> None:
        self.trial_tokens = 0
        self._recent = deque(maxlen=self.window)

    def observe(self, step: Step) -> Decision:
        if step.confidence is None:
            return Decision.CONTINUE
        self._recent.append(step.confidence)
        full = len(self._recent) == self.window
        return (
            Decision.EXIT if full and sum(self._recent) / self.window < self.threshold else Decision.CONTINUE
        )


def lowest_group_confidence(confidences: Sequence[float], window: int) -> float | None:
    """The lowest mean over `window` consecutive token confidences; None for a trace shorter than that."""
    if len(confidences) < window:
        return None
    sums = np.convolve(np.asarray(confidences, dtype=np.float64), np.ones(window), mode="valid")
    return float(sums.min() / window)


@dataclass(frozen=True)
class Warmup:
    """Full warm-up traces' token confidences, for one model (tokenizer) and top-k."""

    model_id: str
    tokenizer_hash: str
    top_k: int
    window: int  # the default window
    traces: tuple[tuple[float, ...], ...]

    def threshold(self, keep: float, window: int | None = None) -> float:
        """s such that `keep` % of the warm-up traces never fall below it over `window` tokens."""
        if not 0 < keep < 100:
            raise ValueError(f"deepconf keep η must be in (0, 100), got {keep}")
        window = window or self.window
        lows = [low for trace in self.traces if (low := lowest_group_confidence(trace, window)) is not None]
        if not lows:
            raise ValueError(
                f"every warm-up trace is shorter than the window of {window} tokens: use a smaller --window"
            )
        return float(np.percentile(lows, 100 - keep))


def run_warmup(
    lm: LoadedModel,
    problems: Sequence[Problem],
    generation: GenerationConfig,
    out_dir: Path,
    top_k: int = 5,
    window: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Full traces of `problems` with their token confidences, written to `out_dir/deepconf.json`."""
    from tqdm import tqdm

    from lynx_exit.engine import DecodeLoop
    from lynx_exit.seeding import rollout_seed

    if not problems:
        raise ValueError("the deepconf warm-up needs at least one problem")
    recorders = [_Recorder(confidence_top_k=top_k) for _ in problems]
    DeepConfPolicy(window=window, confidence_top_k=top_k)  # validates window and top_k before any work
    with FolderLock(out_dir, "lynx-exit deepconf-warmup"):
        prompts = [lm.prompt_ids(p.prompt) for p in problems]
        seeds = [rollout_seed(generation.seed, i, 0, 1) for i in range(len(problems))]
        loop = DecodeLoop(
            lm, prompts, generation, policies=list(recorders), seeds=seeds, max_batch_size=batch_size
        )
        with tqdm(total=len(problems), desc="deepconf warm-up", unit="trace", disable=not progress) as bar:
            for step in loop.steps():
                bar.update(step.finish_reason is not None)
        results = loop.results()
        traces: list[dict[str, Any]] = [
            {
                "problem_id": p.problem_id,
                "correct": p.grade(r.text),
                "confidences": [round(c, 5) for c in rec.confidences],
            }
            for p, r, rec in zip(problems, results, recorders, strict=True)
        ]
        report = {
            "format": WARMUP_FORMAT,
            "model_id": lm.model_id,
            "tokenizer_hash": lm.tokenizer_digest,
            "top_k": top_k,
            "window": window,
            "task": problems[0].task,
            "generation": {
                "temperature": generation.temperature,
                "top_p": generation.top_p,
                "max_new_tokens": generation.max_new_tokens,
                "seed": generation.seed,
            },
            "command": command_line(),
            "traces": traces,
        }
        write_json_atomic(out_dir / WARMUP_FILE, report)
    lows = [low for t in traces if (low := lowest_group_confidence(t["confidences"], window)) is not None]
    return {
        "traces": len(traces),
        "accuracy": sum(bool(t["correct"]) for t in traces) / len(traces),
        "mean_tokens": sum(len(rec.confidences) for rec in recorders) / len(recorders),
        "lowest_group_confidence_percentiles": {str(q): float(np.percentile(lows, q)) for q in (10, 50, 90)}
        if lows
        else {},
    }


@dataclass
class _Recorder(BasePolicy):
    """Never exits; keeps every thinking step's token confidence."""

    confidence_top_k: int = 5
    name: str = "deepconf-warmup"
    confidences: list[float] = field(default_factory=list)

    def observe(self, step: Step) -> Decision:
        if step.confidence is not None:
            self.confidences.append(step.confidence)
        return Decision.CONTINUE


def load_warmup(folder: str | Path) -> Warmup:
    """Read a warm-up folder; a missing or malformed one raises naming the file and the fault."""
    path = Path(folder) / WARMUP_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a deepconf warm-up folder (no {WARMUP_FILE}; "
            "make one with lynx-exit deepconf-warmup)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != WARMUP_FORMAT:
        raise ValueError(f"{path}: not a {WARMUP_FORMAT} file")
    try:
        traces = tuple(tuple(float(c) for c in t["confidences"]) for t in data["traces"])
        warmup = Warmup(
            str(data["model_id"]),
            str(data["tokenizer_hash"]),
            int(data["top_k"]),
            int(data["window"]),
            traces,
        )
    except KeyError as exc:
        raise ValueError(f"{path}: no {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not all(math.isfinite(c) for trace in traces for c in trace):
        raise ValueError(f"{path}: a token confidence is not a finite number")
    return warmup


def _keep(text: str) -> dict[str, Any]:
    value = float(text)
    if not 0 < value < 100:
        raise ValueError("must be in (0, 100)")
    return {"keep": value}


def _build(context: MethodContext, options: dict[str, Any]) -> DeepConfPolicy:
    if context.deepconf is None:
        raise ValueError(
            "exit method 'deepconf' needs a warm-up (--deepconf DIR, made by lynx-exit deepconf-warmup)"
        )
    key = f"deepconf:{context.deepconf}"
    if key not in context.shared:
        warmup = load_warmup(context.deepconf)
        if context.lm is not None and context.lm.tokenizer_digest != warmup.tokenizer_hash:
            raise ValueError(
                f"deepconf warm-up {context.deepconf!r} was made with model {warmup.model_id!r} "
                f"(tokenizer {warmup.tokenizer_hash[:12]}), not {context.lm.model_id!r} "
                f"(tokenizer {context.lm.tokenizer_digest[:12]})"
            )
        context.shared[key] = warmup
    warmup = context.shared[key]
    window = int(options.get("window", warmup.window))
    return DeepConfPolicy(
        threshold=warmup.threshold(float(options["keep"]), window),
        window=window,
        confidence_top_k=warmup.top_k,
    )


register(
    ExitMethod(
        "deepconf",
        "exit when the mean token confidence of the last W tokens falls below the warm-up's (100-η)th "
        "percentile",
        _build,
        knob=Knob(
            "keep",
            "--deepconf-keep",
            "--deepconf-keeps",
            _keep,
            "DeepConf η: per cent of warm-up traces that would never exit",
            default_grid="10,50,90",
        ),
        options=(window_option("window", "tokens in the group confidence (default: the warm-up's)"),),
        needs_deepconf=True,
    )
)
