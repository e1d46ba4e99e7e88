"""The served model with the probe's features taken in its forward: Llama, Qwen2 and Qwen3 classes that take
the residual stream at the probe's layers through vLLM's auxiliary hidden-state path (the one EAGLE-3 uses)
and publish each request's newest token's features, which `lynx_exit.vllm.processor.LynxLogitsProcessor`
scores with the probe once the token turns out to be a decision point.

Layer i < L is the residual stream after block i (vLLM's auxiliary state i, `hidden + residual`), layer L the
final norm's output: the layers of `output_hidden_states` that lynx-exit's probes are trained on."""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from lynx_exit.models.loading import load_model_facts
from lynx_exit.probe import load_probe
from lynx_exit.probe.model import AllKindsScorer
from lynx_exit.probe.sharing import locate_probe
from lynx_exit.vllm.scores import BOARD
from lynx_exit.vllm.settings import probe_location

logger = logging.getLogger(__name__)


def _query_starts() -> torch.Tensor | None:
    """Where each request's query tokens start in this forward's flattened batch, and where the last ends
    ([requests
    + 1]; None in a dummy run)."""
    if not is_forward_context_available():
        return None
    metadata: Any = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batches: refused at load, so never here
        return None
    for each in (metadata or {}).values():
        starts = getattr(each, "query_start_loc", None)
        if starts is not None:
            return starts
    return None


class LynxScoring:
    """Mixed into a vLLM causal LM: loads the probe, asks the decoder for the probe's layers and publishes
    them."""

    _lynx_scorer: AllKindsScorer

    def _lynx_setup(self, vllm_config: Any) -> None:
        if getattr(vllm_config, "use_v2_model_runner", False):
            raise RuntimeError(
                "the lynx-exit vLLM plug-in runs on vLLM's V1 model runner in this release: start vLLM with "
                "VLLM_USE_V2_MODEL_RUNNER=0"
            )
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise RuntimeError(
                "the lynx-exit vLLM plug-in does not support pipeline parallelism in this release"
            )
        if vllm_config.speculative_config is not None:
            raise RuntimeError(
                "the lynx-exit vLLM plug-in does not support speculative decoding in this release"
            )
        location = probe_location()
        bundle = load_probe(locate_probe(location))
        model_config = vllm_config.model_config
        facts = load_model_facts(model_config.tokenizer or model_config.model)
        bundle.spec.check_compatible(facts.feature_spec(bundle.spec.layers), what=f"probe {location!r}")
        num_layers = int(model_config.hf_config.num_hidden_layers)
        self._lynx_layers = tuple(bundle.spec.layers)
        self._lynx_num_layers = num_layers
        aux = tuple(sorted({layer for layer in self._lynx_layers if layer < num_layers}))
        self._lynx_aux = aux
        self.model._set_aux_hidden_state_layers(aux)  # type: ignore[attr-defined]
        # Not a submodule: the checkpoint loader would look for its weights in the model's files.
        object.__setattr__(self, "_lynx_scorer", AllKindsScorer(bundle.probe.float().eval()))
        BOARD.scorer = self._lynx_scorer
        self._lynx_kinds = bundle.kinds
        self._lynx_probe_device: torch.device | None = None
        if bundle.exit_prefix != "lookahead":
            logger.warning(
                "lynx-exit: probe %s was labelled with the %r exit prefix; the plug-in exits with the "
                "look-ahead "
                "one (label with build-data --exit-prefix lookahead for its guarantee to hold as calibrated)",
                location,
                bundle.exit_prefix,
            )
        logger.info(
            "lynx-exit: probe %s on layers %s (%s points)",
            location,
            list(self._lynx_layers),
            ", ".join(self._lynx_kinds),
        )

    def _lynx_publish(self, hidden: torch.Tensor, aux: list[torch.Tensor], positions: torch.Tensor) -> None:
        starts = _query_starts()
        if starts is None or hidden.shape[0] == 0:
            return
        if self._lynx_probe_device != hidden.device:
            self._lynx_scorer.to(hidden.device)
            self._lynx_probe_device = hidden.device
        parts = [
            hidden if layer == self._lynx_num_layers else aux[self._lynx_aux.index(layer)]
            for layer in self._lynx_layers
        ]
        if hidden.shape[0] == starts.shape[0] - 1:  # a decode step: every request fed one token, in order
            BOARD.publish(parts, None, positions)
        else:
            rows = starts[1:] - 1  # each request's last query token
            BOARD.publish(parts, rows, positions[rows])

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        model: Any = self.model  # type: ignore[attr-defined]
        output = model(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        hidden, aux = output if isinstance(output, tuple) else (output, [])
        if BOARD.wanted:
            self._lynx_publish(hidden, aux, positions)
        return hidden


def _make(base: type) -> type:
    class Lynx(LynxScoring, base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self._lynx_setup(vllm_config)

    Lynx.__name__ = Lynx.__qualname__ = "Lynx" + base.__name__
    return Lynx


LynxLlamaForCausalLM = _make(LlamaForCausalLM)
LynxQwen2ForCausalLM = _make(Qwen2ForCausalLM)
LynxQwen3ForCausalLM = _make(Qwen3ForCausalLM)
ARCHITECTURES = {base: "Lynx" + base for base in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")}
