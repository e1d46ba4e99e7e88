"""What the model wrapper hands the logits processor in one worker process: the hidden states (at the probe's
layers) of the token each row fed this step, that token's position, and the probe to score them with. Scoring
waits until a token turns out to be a decision point (the step after), as in lynx-exit's own engine. Nothing
here imports vLLM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Scorer = Callable[[torch.Tensor], torch.Tensor]  # [n, feature_dim] -> [n, kinds] P(safe) as each kind


@dataclass(eq=False)
class StepFeatures:
    """The hidden states of one forward at the probe's layers, and where each request's fed token sits in
    them."""

    parts: list[torch.Tensor]  # per probe layer, in the probe's order: [tokens, hidden]
    token_rows: (
        torch.Tensor | None
    )  # [rows]: the index of each request's fed token among the forward's tokens (None:
    # row i fed token i, a decode step)
    positions: list[int]  # [rows]: that token's position

    @classmethod
    def of_rows(cls, features: torch.Tensor, positions: list[int]) -> StepFeatures:
        """Features already gathered, one row per request ([rows, feature_dim])."""
        return cls([features], None, positions)

    def features(self, rows: Sequence[int]) -> torch.Tensor:
        index = torch.tensor(list(rows), device=self.parts[0].device)
        if self.token_rows is not None:
            index = self.token_rows[index]
        return torch.cat([part[index] for part in self.parts], dim=-1).float()


Handle = tuple[StepFeatures, int]  # a token's features: the step it was fed at, and its row there


def score_handles(handles: Sequence[Handle], scorer: Scorer) -> list[list[float]]:
    """The scores of many tokens' features, one scorer call per step they were fed at."""
    out: list[list[float]] = [[] for _ in handles]
    groups: dict[int, tuple[StepFeatures, list[int]]] = {}
    for i, (step, _) in enumerate(handles):
        groups.setdefault(id(step), (step, []))[1].append(i)
    for step, members in groups.values():
        features = step.features([handles[i][1] for i in members])
        for i, scores in zip(members, scorer(features).tolist(), strict=True):
            out[i] = scores
    return out


class ScoreBoard:
    """Written by the model's forward, read by the processor's `apply` of the same step. `wanted` is set by
    the processor: with no LYNX request in the batch the model publishes nothing (a plain request costs
    nothing)."""

    def __init__(self) -> None:
        self.wanted = False
        self.latest: StepFeatures | None = None
        self.scorer: Scorer | None = None  # the loaded probe (`AllKindsScorer`), set by the model

    def publish(
        self, parts: list[torch.Tensor], token_rows: torch.Tensor | None, positions: torch.Tensor
    ) -> None:
        """On a CPU the forward's tensors are kept as they are and gathered only for a decision point's score;
        elsewhere (a captured graph may reuse its output buffers) the fed tokens' rows are copied now."""
        if parts[0].device.type != "cpu":
            parts = [part.clone() if token_rows is None else part[token_rows] for part in parts]
            token_rows = None
        self.latest = StepFeatures(parts, token_rows, positions.tolist())

    def take(self) -> StepFeatures | None:
        latest, self.latest = self.latest, None
        return latest


BOARD = ScoreBoard()  # one per process: vLLM builds one model and one set of processors per worker
