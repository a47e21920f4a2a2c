#!/usr/bin/env bash
# Train the tiny LLaVA-Phi meant to ship as builtin:tiny, from nothing, on generated scenes.
#   bash scripts/train_tiny.sh [WORK_DIR] [DEVICE]     (defaults: runs/tiny, cpu)
# Stages (a finished stage's output is kept and skipped when the script is run again):
#   0a   the LLM on the scene text (each conversation with its caption where the image goes)
#   0b   the vision tower on the per-patch colour/shape/position pretext
#   1    the projector on captions (vision tower and LLM frozen), as the paper
#   2    projector + LLM + vision tower on the instructions, as the paper
#   2m   stage 2 continued with a focus batch of 128 text-only mc drills a step (mc_text.json):
#        picking the option's letter is a lookup the tiny LLM does not find in the
#        conversations (mc stays at chance, ~0.31, after stage 2)
#   2c   stage 2 continued with a focus batch of colour conversations (colours.json: the colour
#        of each uniquely shaped object) and single-turn image mc questions (mc.json): finding
#        an object by its shape is the binding stage 2 learns worst (colour ~0.70)
# Steps per stage can be overridden: STAGE0A_STEPS, STAGE0B_STEPS, STAGE1_STEPS, STAGE2_STEPS,
# STAGE2M_STEPS, STAGE2C_STEPS; TRAIN_SCENES sets the training set size. Each stage's model is
# scored on held-out scenes of a new seed (eval_<stage>.json; EVAL_LIMIT questions for the
# intermediate stages, all for the last).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/tiny}"
DEVICE="${2:-cpu}"
PY="${PYTHON:-.venv/bin/python}"
LLAVA="$PY -m llava_phi_ros.cli"
N="${TRAIN_SCENES:-20000}"
mkdir -p "$WORK"
[ -f "$WORK/train/scenes.json" ] || $LLAVA scenes --out "$WORK/train" --n "$N" --seed 1 --no-progress
[ -f "$WORK/heldout/scenes.json" ] || $LLAVA scenes --out "$WORK/heldout" --n 500 --seed 2 --no-progress
score() {  # $1 = stage name, $2 = question limit (empty: all)
    $LLAVA eval --model "$WORK/s$1" --data "$WORK/heldout" --device "$DEVICE" --dtype float32 \
        ${2:+--limit $2} --json --no-progress 2>/dev/null | tail -1 > "$WORK/eval_stage$1.json"
    echo "held-out after stage $1: $(cut -c1-200 "$WORK/eval_stage$1.json")"
}
stage() {  # $1 = output name (s<name>), $2 = --init, then the stage's arguments
    local name=$1 init=$2
    shift 2
    if [ -f "$WORK/s$name/model.safetensors" ] && [ ! -d "$WORK/s$name/train_state" ]; then
        echo "stage $name: done before, kept ($WORK/s$name)"
        return
    fi
    $LLAVA train --init "$init" --out "$WORK/s$name" --overwrite --data "$WORK/train" \
        --device "$DEVICE" --no-progress --log-every 50 "$@"
    [ "$name" = 2c ] || score "$name" "${EVAL_LIMIT:-700}"
}
SECONDS=0
stage 0a tiny --stage 0a --steps "${STAGE0A_STEPS:-2000}" --lr 1e-3
stage 0b "$WORK/s0a" --stage 0b --steps "${STAGE0B_STEPS:-3000}" --lr 1e-3
stage 1 "$WORK/s0b" --stage 1 --steps "${STAGE1_STEPS:-300}" --lr 1e-3
stage 2 "$WORK/s1" --stage 2 --steps "${STAGE2_STEPS:-3400}" --lr 1e-3 --tune-vision-tower \
    --save-every 500
stage 2m "$WORK/s2" --stage 2 --steps "${STAGE2M_STEPS:-1000}" --lr 1e-3 --min-lr-ratio 0.1 \
    --tune-vision-tower --batch-size 16 --focus-json "$WORK/train/mc_text.json" \
    --focus-batch-size 128 --save-every 250
stage 2c "$WORK/s2m" --stage 2 --steps "${STAGE2C_STEPS:-1200}" --lr 1e-3 --min-lr-ratio 0.1 \
    --tune-vision-tower --focus-json "$WORK/train/colours.json" \
    --focus-json "$WORK/train/mc.json" --focus-batch-size 24 --save-every 200
echo "training took ${SECONDS} s (scene generation and skipped stages not counted)"
score 2c
