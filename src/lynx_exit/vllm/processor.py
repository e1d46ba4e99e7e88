"""The logits processor of the vLLM plug-in (V1 model runner): one `ExitTracker` per LYNX request of the
persistent batch, fed each step with the request's committed tokens and the scores the model published; it
forces the exit cue, the greedy answer and the end of sequence by masking every other token."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from lynx_exit.exits.registry import ExitSettingError, MethodContext
from lynx_exit.models.loading import load_model_facts
from lynx_exit.vllm.scores import BOARD, Handle, score_handles
from lynx_exit.vllm.settings import MODEL_ENV, probe_location, request_exit
from lynx_exit.vllm.tracker import GREEDY, ExitTracker, TrackerFactory, exit_marker

logger = logging.getLogger(__name__)
_MAX_PARKED = 1024
Entry = tuple[ExitTracker, list[int], SamplingParams]
_MARKER: dict[str, int | None] = {}
_VALIDATION: dict[
    str, MethodContext
] = {}  # the frontend's context per probe (validation reads only the probe)


def _refuse(key: str, message: str) -> None:
    raise ExitSettingError(key, message)


def _marker() -> int | None:
    """The exit marker of the served model (`exit_marker`), read once per process from the engine's model."""
    if "marker" not in _MARKER:
        model = os.environ.get(MODEL_ENV)
        _MARKER["marker"] = exit_marker(load_model_facts(model)) if model else None
    return _MARKER["marker"]


class LynxLogitsProcessor(LogitsProcessor):
    """Select with `--logits-processors lynx_exit.vllm.processor:LynxLogitsProcessor` (or
    `logits_processors=[...]`)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """At admission, in the frontend: a bad `lynx_*` key fails its request alone (HTTP 400)."""
        location = probe_location()
        context = _VALIDATION.get(location)
        if context is None:
            context = _VALIDATION[location] = MethodContext(probe=location)
        settings = request_exit(sampling_params.extra_args, context)
        if settings is None:
            return
        if sampling_params.ignore_eos:
            _refuse(
                "ignore_eos", "a LYNX request ends its forced answer with end of sequence: drop ignore_eos"
            )
        if sampling_params.structured_outputs is not None:
            _refuse(
                "structured_outputs",
                "LYNX forces its exit cue, which a grammar may forbid: drop structured outputs",
            )
        marker = _marker()
        if marker is not None and marker not in (sampling_params.stop_token_ids or []):
            # An exit ends on the marker; as a stop token vLLM reports it as the finish's stop_reason.
            sampling_params.stop_token_ids = [*(sampling_params.stop_token_ids or []), marker]

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        model_config = vllm_config.model_config
        self.factory = TrackerFactory(
            load_model_facts(model_config.tokenizer or model_config.model), probe_location()
        )
        # Batch row -> its tracker, the request's live list of committed tokens and its parameters (one object
        # per request)
        self.rows: dict[int, Entry] = {}
        # Trackers of requests that left the batch, by their parameters: a preempted request comes back with
        # the same `SamplingParams` object (its output list may be a new one) and resumes its tracker.
        self.parked: dict[int, tuple[ExitTracker, SamplingParams]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens

    def _new(
        self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> Entry | None:
        parked = self.parked.pop(id(params), None)
        if parked is not None and parked[1] is params:
            return parked[0], output_ids, params
        settings = request_exit(params.extra_args, self.factory.context)
        if settings is None:
            return None
        tracker = self.factory.tracker(settings, len(prompt_ids or ()), params.stop_token_ids or ())
        return tracker, output_ids, params

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:  # the batch did not change (most steps)
            return
        entries = dict(self.rows)
        before = list(entries.values())
        touched = {*batch_update.removed, *(added[0] for added in batch_update.added)}
        for row in touched & entries.keys():  # may leave: parked first, so a re-add in this update finds it
            self.parked[id(entries[row][2])] = (entries[row][0], entries[row][2])
        process_dict_updates(entries, batch_update, self._new)
        kept = {id(entry[0]) for entry in entries.values()}
        for tracker, _, params in before:  # removed, or replaced at its row: parked (it may come back)
            if id(tracker) not in kept:
                self.parked[id(params)] = (tracker, params)
            elif self.parked.get(id(params), (None,))[0] is tracker:
                del self.parked[id(params)]
        while len(self.parked) > _MAX_PARKED:
            self.parked.pop(next(iter(self.parked)))
        self.rows = entries
        BOARD.wanted = bool(entries)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        step = BOARD.take()
        waiting: list[tuple[ExitTracker, list[int], Handle]] = []
        positions = step.positions if step is not None else []
        for row, (tracker, outputs, _) in self.rows.items():
            if row >= len(positions):
                tracker.at_frontier = False
                continue
            handle = tracker.advance(outputs, positions[row], (step, row))  # type: ignore[arg-type]
            if handle is not None:
                waiting.append((tracker, outputs, handle))
        while waiting:  # the decision points of all rows, scored in one call per step they were fed at
            assert BOARD.scorer is not None
            scores = score_handles([handle for _, _, handle in waiting], BOARD.scorer)
            after = [
                (tracker, outputs, tracker.resume(outputs, s))
                for (tracker, outputs, _), s in zip(waiting, scores, strict=True)
            ]
            waiting = [(tracker, outputs, handle) for tracker, outputs, handle in after if handle is not None]
        rows, tokens, greedy_rows = [], [], []
        for row, (tracker, outputs, _) in self.rows.items():
            if tracker.phase != "exit":
                continue
            token = tracker.force(outputs)
            if token == GREEDY:
                greedy_rows.append(row)
            elif token is not None:
                rows.append(row)
                tokens.append(token)
        if greedy_rows:
            rows += greedy_rows
            tokens += logits[greedy_rows].argmax(dim=-1).tolist()
        if rows:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = float("-inf")
            logits[index, torch.tensor(tokens, device=logits.device)] = 0.0
        return logits
