"""The hooks a plug-in (Speculative Thinking) has into the engine's step. The engine calls them on every
request; this base class does nothing, so the core never asks which requests a plug-in serves."""

from __future__ import annotations

from typing import Any

from lynx_exit.engine.request import Batch, Request
from lynx_exit.engine.types import Step


class EnginePlugin:
    """No plug-in: every hook leaves the request as it is."""

    hooked = False  # whether the hooks do anything (the engine skips calling them when not)

    def state(self, options: Any) -> Any:
        """A new request's plug-in state from its options (None: the request does not use the plug-in)."""
        if options is not None:
            raise ValueError(
                "this request asks for an assistant model, but the engine was built without one "
                "(--assistant-model)"
            )
        return None

    def serves(self, requests: list[Request]) -> bool:
        """Whether any of these requests is the plug-in's (the engine then launches no step ahead)."""
        return any(r.assist is not None for r in requests)

    def before_step(self, running: list[Request]) -> None:
        """Before the step's decode: set up what the running requests feed."""

    def extra_pass(self, batch: Batch, running: list[Request]) -> None:
        """After the decode: replace rows' logits in `batch.parts`, or add rows (`batch.resumed`) that sample
        now."""

    def intercept(self, request: Request, candidate: int) -> list[Step] | None:
        """Take over the reading of a fed token (its steps), or None to let the engine read it."""
        return None

    def after_sample(self, request: Request, candidate: int) -> None:
        """A token the request's model sampled is its next input."""

    def after_commit(self, request: Request, step: Step, candidate: int) -> None:
        """The engine read a token (`step`) and queued the sampled `candidate` after it."""

    def on_exit(self, request: Request) -> None:
        """The request exits: what follows is the engine's exit cue and a greedy answer."""

    def pending(self, request: Request) -> int:
        """Tokens the request wrote that the engine has not read yet."""
        return 0

    def free(self, request: Request, force: bool) -> bool:
        """Free what the plug-in holds for a finished request (force: a held one too); whether it freed
        anything."""
        return False

    def compact(self, drop_rows: bool) -> None:
        """Compact the plug-in's own caches after requests were freed."""

    def report(self, request: Request, generated: int) -> dict[str, Any] | None:
        """The plug-in's account of a finished request (`RequestResult.assist`)."""
        return None
