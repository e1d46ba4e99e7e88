"""Reasoning model families as data: thinking markers, exit cue format, chat-template switches, layers
(a model's resolved profile: `lynx_exit.models.profile`).

A model gets the first family whose `match` holds for its facts (architecture, tokens, chat
template), never for a substring of its name. How thinking starts is read from the model's own
chat template: the generation prompt opens the thinking block (R1, QwQ), leaves it to the model
(Qwen3, gpt-oss) or closes it (Qwen3 with thinking switched off).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lynx_exit.decision_points import (
    DEFAULT_ANSWER_PHRASE,
    DEFAULT_POINTS,
    DEFAULT_STEP_SEPARATOR,
)

# The answer phrase after the thinking block is closed (how-it-works §3). Right after a thinking
# marker it keeps its leading space, exactly as the paper's cue; after a channel header or a
# newline it starts the line.
EXIT_CUE_PHRASES: dict[str, str] = {
    "boxed": " Final Answer: \\boxed{",
    "answer_tag": "<answer> The final answer is \\boxed{",
}

# The official code's layer choices (how-it-works §2), keyed by facts of the architecture:
# (model_type, num_hidden_layers, hidden_size) → output_hidden_states indices.
KNOWN_LAYERS: dict[tuple[str, int, int], tuple[int, ...]] = {
    ("qwen2", 64, 5120): (16, 32, 48, 64),  # QwQ-32B, R1-Distill-Qwen-32B
    ("qwen3", 36, 4096): (12, 18, 24, 36),  # Qwen3-8B
    ("qwen2", 28, 1536): (9, 16, 28),  # R1-Distill-Qwen-1.5B
}


@dataclass(frozen=True)
class ModelFacts:
    """What a family is recognised by."""

    model_type: str
    num_layers: int
    hidden_size: int
    added_tokens: frozenset[str]  # special and added tokens of the tokenizer
    template: str  # the chat template's source ("" if none)

    @classmethod
    def of(cls, model: Any, tokenizer: Any) -> ModelFacts:
        added = getattr(tokenizer, "get_added_vocab", None)
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: read them all
            template = "\n".join(str(t) for t in template.values())
        return cls(
            model_type=str(getattr(model.config, "model_type", "")),
            num_layers=int(model.config.num_hidden_layers),
            hidden_size=int(model.config.hidden_size),
            added_tokens=frozenset(added() if callable(added) else ()),
            template=str(template or ""),
        )

    def has(self, marker: str) -> bool:
        return marker in self.added_tokens or marker in self.template


@dataclass(frozen=True)
class Family:
    name: str
    models: str
    recognised_by: str
    match: Callable[[ModelFacts], bool] = field(repr=False, compare=False)
    think_start: str | None
    think_end: str | None
    exit_close: str  # closes the thinking block and opens the answer, before the answer phrase
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    system_prompt: str | None = None  # added when the caller gives none
    # The chat-template switches a request may set (`chat_template_kwargs`), each with the values it takes
    switches: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    # Decision points (`lynx_exit.decision_points`): the kinds a request gets when it names none, how
    # this family states an answer in its thinking, and what ends a reasoning step (regexes).
    decision_points: tuple[str, ...] = DEFAULT_POINTS
    answer_phrase: str = DEFAULT_ANSWER_PHRASE
    step_separator: str = DEFAULT_STEP_SEPARATOR


def _has_think(facts: ModelFacts) -> bool:
    return facts.has("</think>") or facts.has("<think>")


HARMONY_FINAL = "<|start|>assistant<|channel|>final<|message|>"

FAMILIES: tuple[Family, ...] = (
    Family(
        "gpt-oss",
        "gpt-oss (harmony format)",
        "tokens `<|channel|>` and `<|message|>`, or model type gpt_oss",
        lambda f: {"<|channel|>", "<|message|>"} <= f.added_tokens or f.model_type == "gpt_oss",
        think_start="<|channel|>analysis<|message|>",
        think_end="<|end|>",
        exit_close="<|end|>" + HARMONY_FINAL,
        switches=(("reasoning_effort", ("low", "medium", "high")),),
    ),
    Family(
        "magistral",
        "Magistral",
        "`[/THINK]` in tokens or template",
        lambda f: f.has("[/THINK]"),
        think_start="[THINK]",
        think_end="[/THINK]",
        exit_close="[/THINK]",
    ),
    Family(
        "nemotron",
        "Llama-3.1-Nemotron (Nano, Super, Ultra)",
        "template mentions 'detailed thinking', or model type nemotron-nas (else pass `--family nemotron`)",
        lambda f: "detailed thinking" in f.template or f.model_type == "nemotron-nas",
        think_start="<think>",
        think_end="</think>",
        exit_close="</think>",
        system_prompt="detailed thinking on",
    ),
    Family(
        "phi4-reasoning",
        "Phi-4-reasoning (-plus, -mini)",
        "`<think>` with Phi-4's `<|im_sep|>` token",
        lambda f: "<|im_sep|>" in f.added_tokens and _has_think(f),
        think_start="<think>",
        think_end="</think>",
        exit_close="</think>",
    ),
    Family(
        "qwen3",
        "Qwen3 (hybrid thinking)",
        "`<think>` and an `enable_thinking` switch in the template",
        lambda f: "enable_thinking" in f.template and _has_think(f),
        think_start="<think>",
        think_end="</think>",
        exit_close="</think>",
        template_kwargs=(("enable_thinking", True),),
        switches=(("enable_thinking", (True, False)),),
    ),
    Family(
        "think",
        "DeepSeek-R1 and its Qwen/Llama distills, QwQ, other `<think>` models",
        "`<think>` or `</think>` in tokens or template",
        _has_think,
        think_start="<think>",
        think_end="</think>",
        exit_close="</think>",
    ),
    Family(
        "generic",
        "models without thinking markers (e.g. SmolLM2): all generated text is thinking",
        "fallback",
        lambda f: True,
        think_start=None,
        think_end=None,
        exit_close="\n",
    ),
)
FAMILY_NAMES = tuple(family.name for family in FAMILIES)
