"""What the model wrapper hands the logits processor in one worker process: the probe's scores of the token each row
fed this step, and that token's position. Nothing here imports vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepScores:
    scores: list[list[float]]  # [row][kind]: P(safe) of the row's fed token as each decision point kind
    positions: list[int]  # [row]: the position of that token


class ScoreBoard:
    """Written by the model's forward, read by the processor's `apply` of the same step. `wanted` is set by the
    processor: with no LYNX request in the batch the model skips the probe (a plain request costs nothing)."""

    def __init__(self) -> None:
        self.wanted = False
        self.latest: StepScores | None = None

    def publish(self, scores: torch.Tensor, positions: torch.Tensor) -> None:
        self.latest = StepScores(scores.tolist(), positions.tolist())

    def take(self) -> StepScores | None:
        latest, self.latest = self.latest, None
        return latest


BOARD = ScoreBoard()  # one per process: vLLM builds one model and one set of processors per worker
