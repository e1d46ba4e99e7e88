#!/usr/bin/env bash
# The evaluation quoted in the README: the reference model, LYNX against every baseline, on three
# disjoint slices of 300 held-out problems with different seeds, pooled by benchmarks/eval_slices.py.
# The probe is trained on the arith train split and calibrated on the disjoint calib split, at every decision point
# kind (cue words, stated answers, paragraph ends: for the reference model a line); its realized risk is measured on
# the labelled test split (benchmarks/results/risk_reference.json). deepconf's warm-up uses other train problems.
# Resumable (rerun after an interruption). SLICES="1 2" runs some slices (e.g. two processes side by side with
# OMP_NUM_THREADS=1, once the probe exists; STAGE=probe builds the probe only, STAGE=risk measures the risk only);
# the pooled summary is written when all three are there. Speculative Thinking rows: the small model helped by
# reference-large (a line break ends a step, the analogue of a paragraph), alone and with LYNX; the large model
# alone in its own folder.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
W=${WORK:-runs/eval-reference}
STAGE=${STAGE:-all}
POINTS=cue,answer,paragraph
mkdir -p "$W"
BUILD=(--model reference --task arith --max-new-tokens 500 --decision-points $POINTS --max-events 400)
if [ "$STAGE" = all ] || [ "$STAGE" = probe ]; then
  lynx-exit build-data "${BUILD[@]}" --split train --num-problems 400 --seed 0 --out "$W/d-train"
  lynx-exit build-data "${BUILD[@]}" --split calib --num-problems 300 --seed 1 --out "$W/d-calib"
  if [ ! -f "$R/probe_reference/README.md" ]; then  # calibrate writes the model card last
    lynx-exit train --data "$W/d-train" --out "$R/probe_reference"
    lynx-exit calibrate --probe "$R/probe_reference" --data "$W/d-calib" --deltas 0.02,0.05,0.1,0.2,0.3 --give-up-after 200
  fi
  if [ ! -f "$R/deepconf_reference/deepconf.json" ]; then
    lynx-exit deepconf-warmup --model reference --task arith --split train --offset 400 --num-problems 64 \
      --max-new-tokens 500 --seed 5 --out "$R/deepconf_reference"
  fi
fi
if [ "$STAGE" = all ] || [ "$STAGE" = risk ]; then
  # every decision point of the 900 test problems labelled by forced exits: the realized risk of each calibrated rule
  lynx-exit build-data "${BUILD[@]}" --split test --num-problems 900 --seed 2 --out "$W/d-test"
  lynx-exit risk --probe "$R/probe_reference" --data "$W/d-test" --out "$R/risk_reference.json"
fi
[ "$STAGE" = all ] || [ "$STAGE" = eval ] || exit 0
for i in ${SLICES:-0 1 2}; do
  EVAL=(--model reference --task arith --split test --offset $((300 * i)) --num-problems 300 --max-new-tokens 500
        --seed $((2 + i)) --probe "$R/probe_reference" --deepconf "$R/deepconf_reference" --batch-size 16
        --assistant-model reference-large --assist-trigger '\n' --deltas 0.02,0.05,0.1,0.2,0.3
        --out "$R/eval_reference/slice-$i")
  lynx-exit eval "${EVAL[@]}" \
    --methods never,token-budget,deer,dynasor,nowait,first-answer,answer-convergence,eat,deepconf,speculative-thinking \
    --budgets 150,200,250 --deer-thresholds 0.9,0.95,0.99 --dynasor 32:2,48:3 \
    --agree-counts 2,3 --eat-variances 0.001,0.01,0.1 --deepconf-keeps 90,95,99
  # LYNX at cue words (the paper's) and with stated answers as decision points too
  lynx-exit eval "${EVAL[@]}" --methods lynx,lynx-trajectory,lynx-harm --decision-points 'cue;cue,answer'
  # ... with paragraph ends, and with a give-up threshold
  lynx-exit eval "${EVAL[@]}" --methods lynx-harm --decision-points 'cue,answer,paragraph'
  lynx-exit eval "${EVAL[@]}" --methods lynx-trajectory,lynx-harm --decision-points 'answer;answer,paragraph'
  lynx-exit eval "${EVAL[@]}" --methods lynx-trajectory --decision-points 'cue,answer,paragraph'
  lynx-exit eval "${EVAL[@]}" --methods lynx,lynx-harm --decision-points 'cue,answer' --give-up-deltas 0.05
  lynx-exit eval "${EVAL[@]}" --methods speculative-thinking+lynx
  # the large model alone on the same problems and seeds (its own folder: its "never" is another model's)
  lynx-exit eval --model reference-large --task arith --split test --offset $((300 * i)) --num-problems 300 \
    --max-new-tokens 500 --seed $((2 + i)) --methods never --batch-size 16 --out "$R/eval_reference_large/slice-$i"
done
if [ -f "$R/eval_reference/slice-0/summary.json" ] && [ -f "$R/eval_reference/slice-1/summary.json" ] \
   && [ -f "$R/eval_reference/slice-2/summary.json" ]; then
  python benchmarks/eval_slices.py "$R"/eval_reference/slice-{0,1,2} --out "$R/eval_reference"
fi
if [ -f "$R/eval_reference_large/slice-0/summary.json" ] && [ -f "$R/eval_reference_large/slice-1/summary.json" ] \
   && [ -f "$R/eval_reference_large/slice-2/summary.json" ]; then
  python benchmarks/eval_slices.py "$R"/eval_reference_large/slice-{0,1,2} --out "$R/eval_reference_large"
fi
