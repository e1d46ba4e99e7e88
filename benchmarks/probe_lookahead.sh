#!/usr/bin/env bash
# A probe for the reference model labelled with the look-ahead exit prefix (how the vLLM plug-in exits: the decision
# point's token and the token that confirmed it stay), calibrated, and the realized risk of its rules on held-out
# labelled problems, beside the paper's-prefix probe's (benchmarks/results/risk_reference.json).
#   bash benchmarks/probe_lookahead.sh   (about half an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
W=${WORK:-runs/probe-lookahead}
mkdir -p "$W"
BUILD=(--model reference --task arith --max-new-tokens 500 --decision-points cue,answer,paragraph --max-events 400
       --exit-prefix lookahead)
lynx-exit build-data "${BUILD[@]}" --split train --num-problems 300 --seed 0 --out "$W/d-train"
lynx-exit build-data "${BUILD[@]}" --split calib --num-problems 200 --seed 1 --out "$W/d-calib"
if [ ! -f "$R/probe_reference_lookahead/README.md" ]; then  # calibrate writes the model card last
  lynx-exit train --data "$W/d-train" --out "$R/probe_reference_lookahead"
  lynx-exit calibrate --probe "$R/probe_reference_lookahead" --data "$W/d-calib" --deltas 0.02,0.05,0.1,0.2,0.3 \
    --give-up-after 200
fi
lynx-exit build-data "${BUILD[@]}" --split test --num-problems 300 --seed 2 --out "$W/d-test"
lynx-exit risk --probe "$R/probe_reference_lookahead" --data "$W/d-test" --out "$R/risk_reference_lookahead.json"
