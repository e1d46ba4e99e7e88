"""A model's profile, resolved once per model (`resolve_profile`): its family's markers, exit cue and
switches, the user's overrides, how its chat template starts thinking and the model config's decision-point
settings; and the family table as `lynx-exit profiles` prints it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from lynx_exit.decision_points import (
    DEFAULT_ANSWER_PHRASE,
    DEFAULT_POINTS,
    DEFAULT_STEP_SEPARATOR,
    compile_point_pattern,
    parse_points,
)
from lynx_exit.models.families import (
    EXIT_CUE_PHRASES,
    FAMILIES,
    FAMILY_NAMES,
    KNOWN_LAYERS,
    Family,
    ModelFacts,
)

logger = logging.getLogger(__name__)

ThinkingStart = Literal["template", "model", "off"]


@dataclass(frozen=True)
class ModelProfile:
    """Everything model-specific the engine, the prompts and the artifacts need; resolved once per model."""

    family: str = "think"
    think_start: str | None = "<think>"
    think_end: str | None = "</think>"
    exit_close: str = "</think>"
    thinking: ThinkingStart = "template"  # how thinking starts after a chat prompt
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    system_prompt: str | None = None
    layers: tuple[int, ...] | None = None  # None: the depth rule in `default_layers`
    switches: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # what a request's chat_template_kwargs may set
    reason: str = ""  # why this profile: for `generate --explain`
    # Decision points: the default kinds, the answer phrase and the step separator (the family's, or the model
    # config's `lynx_decision_points`, `lynx_answer_phrase`, `lynx_step_separator`)
    decision_points: tuple[str, ...] = DEFAULT_POINTS
    answer_phrase: str = DEFAULT_ANSWER_PHRASE
    step_separator: str = DEFAULT_STEP_SEPARATOR

    def __post_init__(self) -> None:
        if self.family not in FAMILY_NAMES:
            raise ValueError(f"family must be one of {list(FAMILY_NAMES)}, got {self.family!r}")
        if self.thinking not in ("template", "model", "off"):
            raise ValueError(f"thinking must be 'template', 'model' or 'off', got {self.thinking!r}")
        if self.thinking == "model" and not self.think_start:
            raise ValueError("a profile whose model writes the thinking start needs think_start")
        for name in ("think_start", "think_end"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must be a marker or None, got ''")
        if not self.exit_close:
            raise ValueError("exit_close must not be empty")

    @property
    def answer_header(self) -> str:
        """What opens the answer after the thinking-end marker, e.g. gpt-oss's final-channel header ('' if
        none)."""
        if not self.think_end or not self.exit_close.startswith(self.think_end):
            return ""
        header = self.exit_close.removeprefix(self.think_end)
        return header if header.strip() else ""

    def exit_cue_text(self, cue: str) -> str:
        """The exit cue in this family's format: a variant name (`boxed`, `answer_tag`) or literal text."""
        if cue not in EXIT_CUE_PHRASES:
            return cue
        phrase = EXIT_CUE_PHRASES[cue]
        return self.exit_close + (phrase if self.exit_close == self.think_end else phrase.lstrip())

    def identity(self) -> dict[str, Any]:
        """The fields a probe depends on (recorded in its `FeatureSpec`)."""
        return {
            "family": self.family,
            "think_start": self.think_start,
            "think_end": self.think_end,
            "exit_close": self.exit_close,
            "thinking": self.thinking,
            "template_kwargs": dict(self.template_kwargs),
            "system_prompt": self.system_prompt,
        }


@dataclass(frozen=True)
class ProfileOverrides:
    """User overrides of a profile's fields (CLI flags, `load_model` arguments); None keeps the family's."""

    family: str | None = None
    think_start: str | None = None  # "none": no marker
    think_end: str | None = None  # "none": no marker
    exit_close: str | None = None
    template_kwargs: dict[str, Any] | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.family is not None and self.family not in FAMILY_NAMES:
            raise ValueError(f"family must be one of {list(FAMILY_NAMES)}, got {self.family!r}")


def parse_template_kwargs(text: str | None) -> dict[str, Any] | None:
    """`--chat-template-kwargs '{"enable_thinking": false}'` → a dict."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--chat-template-kwargs must be a JSON object, got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--chat-template-kwargs must be a JSON object, got {text!r}")
    return value


def _marker(value: str | None, default: str | None) -> str | None:
    if value is None:
        return default
    return None if value.lower() == "none" else value


def generation_prompt(
    tokenizer: Any, template_kwargs: dict[str, Any], system_prompt: str | None
) -> str | None:
    """What the chat template appends to open the assistant's turn (None: no template, or it fails)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": "1+1?"}
    ]
    try:
        opened = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **template_kwargs
        )
        closed = tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=False, **template_kwargs
        )
    except Exception as exc:  # a template may raise anything (jinja errors, its own raise_exception)
        logger.warning("could not render the chat template to read how thinking starts: %s", exc)
        return None
    return str(opened)[len(closed) :] if str(opened).startswith(str(closed)) else str(opened)[-200:]


def thinking_start(
    think_start: str | None, think_end: str | None, suffix: str | None
) -> tuple[ThinkingStart, str]:
    """How thinking starts, read from the generation prompt `suffix`, and why."""
    if think_start is None:
        return "template", "no thinking-start marker: all generated text is thinking"
    if suffix is None:
        return "model", f"no chat template to read: the model is expected to write {think_start!r}"
    at = suffix.rfind(think_start)
    if at < 0:
        return "model", f"the generation prompt does not open thinking: the model writes {think_start!r}"
    if think_end and think_end in suffix[at:]:
        return "off", "the generation prompt opens and closes thinking (thinking switched off)"
    return "template", f"the generation prompt opens thinking with {think_start!r}"


def resolve_profile(model: Any, tokenizer: Any, overrides: ProfileOverrides | None = None) -> ModelProfile:
    """The profile of a loaded model: its family (by facts), overrides, and how its template starts
    thinking."""
    overrides = overrides or ProfileOverrides()
    facts = ModelFacts.of(model, tokenizer)
    if overrides.family is not None:
        family = next(f for f in FAMILIES if f.name == overrides.family)
        why = f"family {family.name!r} chosen by the user"
    else:
        family = next(f for f in FAMILIES if f.match(facts))
        why = f"family {family.name!r}: {family.recognised_by}"
    think_start = _marker(overrides.think_start, family.think_start)
    think_end = _marker(overrides.think_end, family.think_end)
    exit_close = overrides.exit_close or (
        family.exit_close if think_end == family.think_end else (think_end or "\n")
    )
    template_kwargs = {**dict(family.template_kwargs), **(overrides.template_kwargs or {})}
    system_prompt = overrides.system_prompt if overrides.system_prompt is not None else family.system_prompt
    suffix = generation_prompt(tokenizer, template_kwargs, system_prompt)
    thinking, how = thinking_start(think_start, think_end, suffix)
    layers = getattr(model.config, "lynx_layers", None)
    key = (facts.model_type, facts.num_layers, facts.hidden_size)
    if layers:
        layer_why = "layers from the model config's lynx_layers"
    elif key in KNOWN_LAYERS:
        layers, layer_why = KNOWN_LAYERS[key], f"the official code's layers for {key[0]} with {key[1]} layers"
    else:
        layer_why = "layers at ¼, ½, ¾ depth and the last"
    return ModelProfile(
        family=family.name,
        think_start=think_start,
        think_end=think_end,
        exit_close=exit_close,
        thinking=thinking,
        template_kwargs=tuple(sorted(template_kwargs.items())),
        system_prompt=system_prompt,
        layers=tuple(int(x) for x in layers) if layers else None,
        reason=f"{why}; {how}; {layer_why}",
        switches=_switches(family, overrides.template_kwargs or {}),
        **_point_settings(family, model.config),
    )


def _point_settings(family: Family, config: Any) -> dict[str, Any]:
    """The decision-point settings of a model: its family's, each overridden by the model config's `lynx_…`
    key."""
    points = getattr(config, "lynx_decision_points", None)
    answer_phrase = str(getattr(config, "lynx_answer_phrase", None) or family.answer_phrase)
    step_separator = str(getattr(config, "lynx_step_separator", None) or family.step_separator)
    compile_point_pattern("answer phrase", answer_phrase)  # a bad one fails at load, naming itself
    compile_point_pattern("step separator", step_separator)
    return {
        "decision_points": parse_points(points) if points else family.decision_points,
        "answer_phrase": answer_phrase,
        "step_separator": step_separator,
    }


def _switches(family: Family, given: dict[str, Any]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The family's switches, and the ones the user set for this model (a true/false one takes either value,
    any other only the value given)."""
    out = dict(family.switches)
    for key, value in given.items():
        if key not in out:
            out[key] = (True, False) if isinstance(value, bool) else (value,)
    return tuple(sorted(out.items()))


def profiles_table(markdown: bool = False) -> list[dict[str, str]] | str:
    """The family table printed by `lynx-exit profiles` (and copied into the README)."""
    rows = []
    for family in FAMILIES:
        profile = ModelProfile(
            family=family.name,
            think_start=family.think_start,
            think_end=family.think_end,
            exit_close=family.exit_close,
        )
        rows.append(
            {
                "family": family.name,
                "models": family.models,
                "recognised by": family.recognised_by,
                "thinking": "—"
                if family.think_start is None
                else f"`{family.think_start}` … `{family.think_end}`",
                "exit cue (boxed)": json.dumps(profile.exit_cue_text("boxed"), ensure_ascii=False),
                "template switches": ", ".join(
                    [f"`{k}={json.dumps(v)}`" for k, v in family.template_kwargs]
                    + ([f"system prompt {family.system_prompt!r}"] if family.system_prompt else [])
                )
                or "—",
            }
        )
    if not markdown:
        return rows
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    text = "`" + text + "`" if text.startswith('"') else text
    return text.replace("|", "\\|")


LAYER_RULE = (
    "--layers, else the model config's lynx_layers, else the official code's choice for known architectures ("
    + "; ".join(
        f"{kind} with {n} layers of width {width}: {list(layers)}"
        for (kind, n, width), layers in KNOWN_LAYERS.items()
    )
    + "), else ¼, ½, ¾ depth and the last (8/16/24/32 for 32-layer models, as the official code)"
)
