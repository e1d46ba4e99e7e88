#!/usr/bin/env bash
# The evaluation quoted in the README: reference model, 300 held-out problems, LYNX vs baselines.
# Probe trained on the arith train split and calibrated on the disjoint calib split. ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
W=${WORK:-runs/eval-reference}
mkdir -p "$W"
lynx-exit build-data --model reference --task arith --split train --num-problems 400 --max-new-tokens 500 --seed 0 --out "$W/d-train"
lynx-exit build-data --model reference --task arith --split calib --num-problems 300 --max-new-tokens 500 --seed 1 --out "$W/d-calib"
lynx-exit train --data "$W/d-train" --out "$R/probe_reference"
lynx-exit calibrate --probe "$R/probe_reference" --data "$W/d-calib" --deltas 0.02,0.05,0.1,0.2,0.3
lynx-exit eval --model reference --task arith --split test --num-problems 300 --max-new-tokens 500 --seed 2 \
  --probe "$R/probe_reference" --methods never,token-budget,lynx,lynx-trajectory,lynx-harm,deer,dynasor,nowait \
  --budgets 150,200,250 --deltas 0.02,0.05,0.1,0.2,0.3 --deer-thresholds 0.9,0.95,0.99 --dynasor 32:2,48:3 \
  --batch-size 16 --out "$R/eval_reference"
