"""Seeds that do not depend on how work is batched or split: the same problem and rollout draw the same tokens
in build-data, eval, the DeepConf warm-up, on one machine or on Ray workers."""

from __future__ import annotations


def rollout_seed(base_seed: int, problem_index: int, rollout: int, rollouts_per_problem: int) -> int:
    """Seed of one rollout, independent of how rollouts are batched."""
    return base_seed * 1_000_003 + problem_index * rollouts_per_problem + rollout
