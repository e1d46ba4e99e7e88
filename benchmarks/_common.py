"""Shared helpers for benchmark scripts: environment facts and JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**payload, "environment": environment()}, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def never_exit_probe(lm: Any, folder: Path, seed: int = 0) -> Path:
    """A randomly initialised probe in `lm`'s default feature space whose calibration never exits.

    Scoring costs exactly what a trained probe costs; never exiting keeps both sides of a
    throughput comparison at the same number of tokens.
    """
    from lynx_exit.probe import Probe, save_probe, write_conformal

    spec = lm.feature_spec()
    torch.manual_seed(seed)
    save_probe(folder, Probe(spec.feature_dim), spec, {"training_task": "none (random weights, for timing)"})
    never = {"delta": 0.05, "q_pos": 0.0, "q_neg": "inf", "n_pos": 0, "n_neg": 0}
    write_conformal(folder, {"event": [never], "trajectory": [], "harm": []})
    return folder
