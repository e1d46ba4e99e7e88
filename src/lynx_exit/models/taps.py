"""Hidden-state taps: the decoder's modules found by layout, a forward hook without hooks (`tap_forward`), and
`HiddenStateCapture`, which keeps the states at chosen layers from the forward pass the engine runs anyway."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def decoder_modules(model: nn.Module) -> tuple[nn.Module, Sequence[nn.Module], nn.Module]:
    """(embedding, blocks, final norm) of a decoder-only transformer."""
    base: Any = model.get_decoder() if hasattr(model, "get_decoder") else model  # type: ignore[operator]
    for blocks_name, norm_name, embed_name in _DECODER_LAYOUTS:
        if hasattr(base, blocks_name) and hasattr(base, norm_name) and hasattr(base, embed_name):
            return getattr(base, embed_name), getattr(base, blocks_name), getattr(base, norm_name)
    raise ValueError(
        f"cannot find decoder blocks in {type(model).__name__}; known layouts (blocks, final norm, "
        "embeddings): "
        f"{list(_DECODER_LAYOUTS)}"
    )


def _has_position_embeddings(model: nn.Module) -> bool:
    base: Any = model.get_decoder() if hasattr(model, "get_decoder") else model  # type: ignore[operator]
    return hasattr(base, "wpe")


# (blocks, final norm, embeddings) under the decoder: Llama, Qwen2/3, Mistral/Magistral, Phi-3/4, gpt-oss,
# Nemotron (Llama); GPT-2 / Falcon; Phi-1/2; GPT-NeoX; OPT.
_DECODER_LAYOUTS = (
    ("layers", "norm", "embed_tokens"),
    ("h", "ln_f", "wte"),
    ("h", "ln_f", "word_embeddings"),
    ("layers", "final_layernorm", "embed_tokens"),
    ("layers", "final_layer_norm", "embed_in"),
    ("layers", "final_layer_norm", "embed_tokens"),
)


_TAPS = "_lynx_exit_taps"  # per-module list of sinks, stored on the module instance


def tap_forward(module: nn.Module, sink: Callable[[Any], None]) -> Callable[[], None]:
    """Call `sink(output)` after every forward of `module`; returns the function that removes it.

    Why not `register_forward_hook`: a hook sends every call of the module down nn.Module's slow
    path, measured at ~7 µs per hooked block per decode step on the reference model (2.3 % of a
    step for four layers); wrapping the instance's `forward` costs ~1 µs. Several taps on one
    module share one wrapper and may be removed in any order; the last removal restores `forward`.
    """
    sinks: list[Callable[[Any], None]] | None = module.__dict__.get(_TAPS)
    if sinks is None:
        sinks = []
        original = module.forward
        had_own = "forward" in module.__dict__  # e.g. accelerate's device hooks wrap forward the same way

        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            for each in sinks:
                each(output)
            return output

        module.__dict__[_TAPS] = sinks
        module.__dict__[_TAPS + "_restore"] = (original, had_own)
        module.forward = forward  # type: ignore[method-assign]
    sinks.append(sink)

    def remove() -> None:
        if sink not in sinks:
            return
        sinks.remove(sink)
        if not sinks:
            original, had_own = module.__dict__.pop(_TAPS + "_restore")
            del module.__dict__[_TAPS]
            if had_own:
                module.forward = original  # type: ignore[method-assign]
            else:
                del module.__dict__["forward"]

    return remove


class HiddenStateCapture:
    """Taps on the decoder's forward passes that keep the hidden states at the chosen layers.

    Index convention of `output_hidden_states` (how-it-works §2): 0 = embeddings, i = output of
    block i, num_layers = after the final norm. Reads the forward pass the loop runs anyway.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        self._model = model
        self.layers: tuple[int, ...] = ()
        self._latest: dict[int, torch.Tensor] = {}
        self._removers: list[Callable[[], None]] = []
        self.extend(layers)

    def extend(self, layers: Sequence[int]) -> None:
        """Tap these layers too (the ones tapped already stay, in their order; the new ones follow)."""
        model = self._model
        embed, blocks, norm = decoder_modules(model)
        num_layers = len(blocks)
        new = [layer for layer in dict.fromkeys(layers) if layer not in self.layers]
        for layer in new:
            if layer == 0 and _has_position_embeddings(model):
                raise ValueError(
                    "layer 0 of a model with absolute position embeddings (GPT-2 style) is not "
                    "the token embedding alone: choose layers >= 1"
                )
            if not 0 <= layer <= num_layers:
                raise ValueError(f"layer {layer} out of range 0..{num_layers}")
        for layer in new:  # checked first: a bad layer taps nothing
            module = embed if layer == 0 else norm if layer == num_layers else blocks[layer - 1]
            self._removers.append(tap_forward(module, self._make_sink(layer)))
        self.layers = (*self.layers, *new)

    def _make_sink(self, layer: int) -> Callable[[Any], None]:
        def sink(output: Any) -> None:
            # Keep a reference only (no slicing on the hot path): `features` slices what it needs.
            self._latest[layer] = output[0] if isinstance(output, tuple) else output  # [batch, seq, hidden]

        return sink

    def snapshot(self) -> dict[int, torch.Tensor]:
        """The last forward pass's states by layer (references, no copy): later passes do not change it."""
        return dict(self._latest)

    def features(
        self,
        rows: torch.Tensor | None = None,
        snapshot: dict[int, torch.Tensor] | None = None,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """[batch, len(layers) * hidden] float32 of the last forward pass or of `snapshot` (only `rows`, if
        given; only `layers` of the tapped ones, if given)."""
        latest = self._latest if snapshot is None else snapshot
        states = [latest[layer][:, -1, :] for layer in (self.layers if layers is None else layers)]
        if rows is not None:
            states = [s.index_select(0, rows) for s in states]
        return torch.cat(states, dim=-1).float()

    def close(self) -> None:
        for remove in self._removers:
            remove()
        self._removers.clear()

    def __enter__(self) -> HiddenStateCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tappable_layers(model: nn.Module) -> tuple[int, ...]:
    """Every layer a capture can tap (layer 0 only without absolute position embeddings)."""
    _, blocks, _ = decoder_modules(model)
    return tuple(range(1 if _has_position_embeddings(model) else 0, len(blocks) + 1))


class LayerSelection:
    """Some layers of a capture that taps more, read like a `HiddenStateCapture` of their own (a compiled
    decode step taps every layer, whatever is asked, so that its graph never changes with the layers)."""

    def __init__(self, capture: HiddenStateCapture, layers: Sequence[int]) -> None:
        missing = sorted(set(layers) - set(capture.layers))
        if missing:
            raise ValueError(f"layers {missing} are not tapped (tapped: {list(capture.layers)})")
        self.capture, self.layers = capture, tuple(layers)

    def snapshot(self) -> dict[int, torch.Tensor]:
        return {layer: state for layer, state in self.capture.snapshot().items() if layer in self.layers}

    def features(
        self, rows: torch.Tensor | None = None, snapshot: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        return self.capture.features(rows, snapshot, self.layers)

    def close(self) -> None:
        """Nothing to remove: the taps are the capture's."""
