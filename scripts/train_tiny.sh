#!/usr/bin/env bash
# Train the tiny LLaVA-Phi that ships as builtin:tiny, from nothing, on generated scenes.
#   bash scripts/train_tiny.sh [WORK_DIR]        (default WORK_DIR: runs/tiny)
# Steps per stage can be overridden: STAGE0_STEPS, STAGE1_STEPS, STAGE2_STEPS, TRAIN_SCENES.
# Every stage's output is scored on 500 held-out scenes of a new seed (eval_stage*.json).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/tiny}"
PY=.venv/bin/python
LLAVA="$PY -m llava_phi_ros.cli"
N="${TRAIN_SCENES:-20000}"
mkdir -p "$WORK"
[ -f "$WORK/train/scenes.json" ] || $LLAVA scenes --out "$WORK/train" --n "$N" --seed 1 --no-progress
[ -f "$WORK/heldout/scenes.json" ] || $LLAVA scenes --out "$WORK/heldout" --n 500 --seed 2 --no-progress
score() {  # $1 = model dir, $2 = name
    $LLAVA eval --model "$1" --data "$WORK/heldout" --json --no-progress 2>/dev/null | tail -1 > "$WORK/eval_$2.json"
    echo "held-out after $2: $(cut -c1-200 "$WORK/eval_$2.json")"
}
$LLAVA train --stage 0 --data "$WORK/train" --init tiny --out "$WORK/s0" --overwrite \
    --steps "${STAGE0_STEPS:-1200}" --lr 1e-3 --save-every 400 --no-progress
score "$WORK/s0" stage0
$LLAVA train --stage 1 --data "$WORK/train" --init "$WORK/s0" --out "$WORK/s1" --overwrite \
    --steps "${STAGE1_STEPS:-300}" --lr 1e-3 --no-progress
score "$WORK/s1" stage1
$LLAVA train --stage 2 --data "$WORK/train" --init "$WORK/s1" --out "$WORK/s2" --overwrite \
    --steps "${STAGE2_STEPS:-4000}" --lr 5e-4 --save-every 500 --no-progress
score "$WORK/s2" stage2
