"""`DecodeLoop`: a batch job on the engine (all prompts known up front, results by prompt index)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from lynx_exit.engine.assist import AssistConfig
from lynx_exit.engine.config import EngineConfig, GenerationConfig
from lynx_exit.engine.engine import Engine
from lynx_exit.engine.types import ExitPolicy, RequestResult, Step
from lynx_exit.models import LoadedModel


class DecodeLoop:
    """Run a fixed list of prompts on a fresh engine; iterate `steps()` or call `run()`.

    Request ids are the prompt indices. `max_batch_size` below the number of prompts turns on
    continuous batching (a finished request's row goes to the next prompt). `seeds` default to
    `config.seed + i`; `layers` asks for `Step.features` at those layers for every prompt;
    `hold` keeps every cache after it finishes, for `engine.forced_answers`; `decision_points`: the kinds
    found (`Step.point`) for prompts without a policy. `engine`: the engine's settings (its batch size is
    `max_batch_size`'s); `assistant` with `assist`: Speculative Thinking."""

    def __init__(
        self,
        lm: LoadedModel,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig | None = None,
        policies: Sequence[ExitPolicy | None] | None = None,
        layers: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
        max_batch_size: int | None = None,
        hold: bool = False,
        engine: EngineConfig | None = None,
        assist: AssistConfig | None = None,
        assistant: LoadedModel | None = None,
        decision_points: Sequence[str] | None = None,
    ) -> None:
        config = config or GenerationConfig()
        n = len(prompts)
        if not prompts:
            raise ValueError("DecodeLoop needs at least one prompt")
        if policies is not None and len(policies) != n:
            raise ValueError(f"got {len(policies)} policies for {n} prompts")
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        settings = replace(engine or EngineConfig(), max_batch_size=min(n, max_batch_size or n))
        self.engine = Engine(lm, config=settings, assistant=assistant)
        self.num_prompts = n
        for i, prompt in enumerate(prompts):
            self.engine.add_request(
                prompt,
                config,
                policy=policies[i] if policies is not None else None,
                seed=seeds[i] if seeds is not None else config.seed + i,
                assist=assist,
                feature_layers=layers,
                hold=hold,
                decision_points=decision_points,
            )

    def steps(self) -> Iterator[Step]:
        """Every request's steps, in engine order, until all prompts have finished.

        A batch job keeps nothing back: a prompt that failed alone (finish_reason "error") raises here,
        with the engine's exception as the cause."""
        for step in self.engine.stream():
            if step.finish_reason == "error":
                raise RuntimeError(f"prompt {step.request_id} failed: {step.error}") from self.engine.error(
                    step.request_id
                )
            yield step

    def run(self) -> list[RequestResult]:
        for _ in self.steps():
            pass
        return self.results()

    def results(self) -> list[RequestResult]:
        return [self.result(i) for i in range(self.num_prompts)]

    def result(self, i: int) -> RequestResult:
        """The result of prompt `i` (available as soon as its last step was yielded)."""
        return self.engine.result(i)
