"""`lynx-exit demo`: the whole LYNX loop on the shipped reference model, offline, in minutes."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lynx_exit.engine import GenerationConfig
from lynx_exit.evaluate import markdown_table, run_eval, write_report
from lynx_exit.exits import parse_methods
from lynx_exit.models import load_model
from lynx_exit.probe import ProbeTrainConfig, load_probe
from lynx_exit.probe.build_data import BuildConfig, build_dataset, load_dataset
from lynx_exit.probe.calibration import calibrate_probe_folder, empirical_rates, train_probe_folder
from lynx_exit.reference import as_task_problems, make_problems

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    train_problems: int = 500
    calib_problems: int = 300
    test_problems: int = 150
    deltas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    budgets: tuple[int, ...] = (120, 160, 200)
    seed: int = 0
    max_new_tokens: int = 400
    batch_size: int = 16
    model: str = "reference"

    def __post_init__(self) -> None:
        for name in ("train_problems", "calib_problems", "test_problems", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def run_demo(config: DemoConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Build data → train → calibrate → evaluate never / token budget / LYNX on held-out problems."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = load_model(config.model)
    spec = lm.feature_spec()
    generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens, temperature=0.6, top_p=0.95, seed=config.seed
    )
    build = BuildConfig(batch_size=config.batch_size)
    splits = {
        "train": as_task_problems(
            make_problems("train", config.train_problems, seed=config.seed + 17), "train"
        ),
        "calib": as_task_problems(make_problems("calib", config.calib_problems), "calib"),
        "test": as_task_problems(make_problems("test", config.test_problems), "test"),
    }
    summaries = {}
    for split in ("train", "calib"):
        summaries[split] = build_dataset(
            lm, splits[split], out_dir / f"data-{split}", generation, build, spec, progress=progress
        )
    metrics = train_probe_folder(
        load_dataset(out_dir / "data-train"),
        out_dir / "probe",
        ProbeTrainConfig(seed=config.seed),
        "data-train",
    )
    calibrate_probe_folder(out_dir / "probe", load_dataset(out_dir / "data-calib"), deltas=config.deltas)
    grids = {"budget": ",".join(map(str, config.budgets)), "delta": ",".join(map(str, config.deltas))}
    settings = parse_methods(["never", "token-budget", "lynx", "lynx-harm"], grids, extra={"mode": "event"})
    eval_generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens, temperature=0.6, top_p=0.95, seed=config.seed + 1
    )
    summary = run_eval(
        lm,
        splits["test"],
        settings,
        eval_generation,
        out_dir / "eval",
        batch_size=config.batch_size,
        progress=progress,
        probe=str(out_dir / "probe"),
    )
    rates = empirical_rates(load_probe(out_dir / "probe"), load_dataset(out_dir / "data-calib"))
    meta = {
        "demo_config": asdict(config),
        "probe_data": summaries,
        "probe_metrics": metrics,
        "calibration_rates": rates,
        "demo_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(summary, out_dir / "eval", meta, title="lynx-exit demo: reference model, held-out problems")
    (out_dir / "demo.json").write_text(json.dumps({**meta, **summary}, indent=2) + "\n")
    return {**meta, **summary, "table": markdown_table(summary)}
