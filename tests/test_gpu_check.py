"""`benchmarks/gpu_check.py --device cpu --tiny`: the GPU check's own code, run here on a tiny model (a smoke
test of the script: every side of a row measured, the JSON complete)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_the_gpu_check_runs_on_a_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [
            sys.executable,
            "gpu_check.py",
            "--device",
            "cpu",
            "--tiny",
            "--skip-tests",
            "--batches",
            "2",
            "--shapes",
            "9+5",
            "--side-s",
            "60",
            "--json",
            str(out),
            "--sides",
            "eager,compiled_lynx,generate_static",
        ],  # one compile (the LYNX side's) keeps CI short
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["tests"] == {"status": "skipped (--skip-tests)"}
    (row,) = payload["rows"]
    assert (row["batch"], row["prompt"], row["new_tokens"]) == (2, 9, 5)
    for side in ("eager", "compiled_lynx", "generate_static"):
        assert row[side]["tokens_per_s"] > 0, (side, row[side])
        assert row[side]["roofline_share"] > 0
    assert (
        row["compiled_lynx"]["complete"] and row["compiled_lynx"]["decode_steps"] == 4
    )  # 5 tokens: the first is the prefill's
    assert row["compiled_lynx"]["cues_scored"] > 0  # the LYNX side scores cues
    assert row["compiled_lynx"]["launched_ahead"] > 0  # with overlap, as on CUDA
    assert payload["graphs_compiled"] >= 1 and payload["warm_up"] == {"skipped": "not asked (--sides)"}
