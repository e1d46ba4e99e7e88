"""Per-request exit settings of the vLLM plug-in: `SamplingParams.extra_args` (offline) or the OpenAI body's
`vllm_xargs` (`vllm serve`), named as lynx-exit's own `exit` object with a `lynx_` prefix and checked by the
same registry. Nothing here imports vLLM."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lynx_exit.exits.registry import METHODS, ExitSettingError, MethodContext, resolve_exit_options

PROBE_ENV = "LYNX_VLLM_PROBE"  # the probe folder (or Hub repo id): every process of the engine reads it
MODEL_ENV = "LYNX_VLLM_MODEL"  # the served model, for the frontend (it lists the exit marker as a stop token)
PREFIX = "lynx_"
DEFAULT_METHOD = "lynx"
# Knobs of the exit object that are not exit-method settings: how the forced answer ends.
ANSWER_MAX_TOKENS = "answer_max_tokens"
DEFAULT_ANSWER_MAX_TOKENS = 64
PLUGIN_METHODS = tuple(
    name for name, method in sorted(METHODS.items()) if method.needs_probe and not method.assisted
)


@dataclass(frozen=True)
class RequestExit:
    """A request's resolved exit settings: the method, its options for `make_policy`, the answer's token
    cap."""

    method: str
    options: tuple[tuple[str, Any], ...]
    answer_max_tokens: int


def probe_location() -> str:
    """The probe the plug-in serves, from `$LYNX_VLLM_PROBE`; a clear error when it is not set."""
    location = os.environ.get(PROBE_ENV, "").strip()
    if not location:
        raise RuntimeError(
            f"the lynx-exit vLLM plug-in needs a probe: set {PROBE_ENV}=DIR (a folder from lynx-exit "
            "calibrate, or a Hub repo id) in the environment vLLM runs in"
        )
    return location


def request_exit(extra_args: dict[str, Any] | None, context: MethodContext) -> RequestExit | None:
    """The request's exit settings from its `lynx_*` keys, or None when it has none (it runs untouched).

    A bad key or value raises `ExitSettingError` naming the key as the request spelled it (`lynx_delta`);
    vLLM turns it into a 400 for that request alone."""
    given = {key[len(PREFIX) :]: value for key, value in (extra_args or {}).items() if key.startswith(PREFIX)}
    if not given:
        return None
    answer_max = given.pop(ANSWER_MAX_TOKENS, DEFAULT_ANSWER_MAX_TOKENS)
    if isinstance(answer_max, bool) or not isinstance(answer_max, int) or not 1 <= answer_max <= 4096:
        raise ExitSettingError(
            PREFIX + ANSWER_MAX_TOKENS,
            f"{PREFIX}{ANSWER_MAX_TOKENS} must be a whole number in [1, 4096], got {answer_max!r}",
        )
    if given.get("exit_prefix", "lookahead") != "lookahead":
        raise ExitSettingError(
            PREFIX + "exit_prefix",
            f"{PREFIX}exit_prefix: the vLLM plug-in cannot take back a sampled "
            f"token, so its exits keep the look-ahead (got {given['exit_prefix']!r})",
        )
    given["exit_prefix"] = "lookahead"
    method = given.get("method", DEFAULT_METHOD)
    if method not in PLUGIN_METHODS:
        raise ExitSettingError(
            PREFIX + "method",
            f"{PREFIX}method must be one of {', '.join(PLUGIN_METHODS)} in the vLLM plug-in, got {method!r}",
        )
    try:
        name, options, _ = resolve_exit_options(given, DEFAULT_METHOD, {}, context)
    except ExitSettingError as exc:
        key = PREFIX + exc.param.removeprefix("exit.")
        message = str(exc).replace(exc.param, key)
        raise ExitSettingError(key, message if key in message else f"{key}: {message}", exc.code) from None
    return RequestExit(name, tuple(sorted(options.items())), int(answer_max))
