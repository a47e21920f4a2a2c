#!/usr/bin/env bash
# Train the tiny LLaVA-Phi that ships as builtin:tiny, from nothing, on generated scenes.
#   bash scripts/train_tiny.sh [WORK_DIR] [DEVICE]     (defaults: runs/tiny, cpu)
# Stages: 0a the LLM on the scene text (+ text-only mc drills), 0b the vision tower on the patch
# pretext, 1 the projector on captions, 2 projector + LLM + vision tower on the instructions.
# Steps per stage can be overridden: STAGE0A_STEPS, STAGE0B_STEPS, STAGE1_STEPS, STAGE2_STEPS;
# TRAIN_SCENES sets the training set size. Each stage's model is scored on held-out scenes of a
# new seed (eval_<stage>.json; EVAL_LIMIT questions for the intermediate stages, all for the last).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/tiny}"
DEVICE="${2:-cpu}"
PY="${PYTHON:-.venv/bin/python}"
LLAVA="$PY -m llava_phi_ros.cli"
N="${TRAIN_SCENES:-20000}"
COMMON="--data $WORK/train --device $DEVICE --no-progress --log-every 50"
mkdir -p "$WORK"
[ -f "$WORK/train/scenes.json" ] || $LLAVA scenes --out "$WORK/train" --n "$N" --seed 1 --no-progress
[ -f "$WORK/heldout/scenes.json" ] || $LLAVA scenes --out "$WORK/heldout" --n 500 --seed 2 --no-progress
score() {  # $1 = model dir, $2 = name, $3 = question limit (empty: all)
    $LLAVA eval --model "$1" --data "$WORK/heldout" --device "$DEVICE" --dtype float32 \
        ${3:+--limit $3} --json --no-progress 2>/dev/null | tail -1 > "$WORK/eval_$2.json"
    echo "held-out after $2: $(cut -c1-200 "$WORK/eval_$2.json")"
}
SECONDS=0
$LLAVA train --stage 0a --init tiny --out "$WORK/s0a" --overwrite $COMMON \
    --steps "${STAGE0A_STEPS:-2000}" --lr 1e-3
score "$WORK/s0a" stage0a "${EVAL_LIMIT:-700}"
$LLAVA train --stage 0b --init "$WORK/s0a" --out "$WORK/s0b" --overwrite $COMMON \
    --steps "${STAGE0B_STEPS:-3000}" --lr 1e-3
score "$WORK/s0b" stage0b "${EVAL_LIMIT:-700}"
$LLAVA train --stage 1 --init "$WORK/s0b" --out "$WORK/s1" --overwrite $COMMON \
    --steps "${STAGE1_STEPS:-300}" --lr 1e-3
score "$WORK/s1" stage1 "${EVAL_LIMIT:-700}"
$LLAVA train --stage 2 --init "$WORK/s1" --out "$WORK/s2" --overwrite $COMMON \
    --steps "${STAGE2_STEPS:-5000}" --lr 1e-3 --tune-vision-tower --save-every 500
echo "training took ${SECONDS} s (scene generation not counted)"
score "$WORK/s2" stage2
