#!/usr/bin/env bash
# Train the tiny LLaVA-Phi meant to ship as builtin:tiny, from nothing, on generated scenes.
#   bash scripts/train_tiny.sh [WORK_DIR] [DEVICE]     (defaults: runs/tiny, cpu)
# Stages (a finished stage's output is kept and skipped when the script is run again):
#   0a   the LLM on the scene text (each conversation with its caption where the image goes),
#        plus a focus batch of multiple-choice questions each step (mc.json with the caption
#        in the image's place, and the text-only drills of mc_text.json): an mc answer is one
#        token of a long conversation, too small a part of the loss to be learnt otherwise
#   0b   the vision tower on the per-patch colour/shape/position pretext
#   1    the projector on captions (vision tower and LLM frozen), as the paper
#   2    projector + LLM + vision tower on the instructions, as the paper (+ the mc focus batch)
# Steps per stage can be overridden: STAGE0A_STEPS, STAGE0B_STEPS, STAGE1_STEPS, STAGE2_STEPS,
# the focus batch sizes FOCUS0A_BATCH, FOCUS2_BATCH and the stage-2 focus weight FOCUS2_WEIGHT;
# TRAIN_SCENES sets the training set size. Each stage's model is scored on held-out
# scenes of a new seed (eval_<stage>.json; EVAL_LIMIT questions for the intermediate stages).
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
    [ "$name" = 2 ] || score "$name" "${EVAL_LIMIT:-700}"
}
MC_FOCUS=(--focus-json "$WORK/train/mc.json" --focus-json "$WORK/train/mc_text.json")
SECONDS=0
stage 0a tiny --stage 0a --steps "${STAGE0A_STEPS:-2000}" --lr 1e-3 \
    "${MC_FOCUS[@]}" --focus-batch-size "${FOCUS0A_BATCH:-64}"
stage 0b "$WORK/s0a" --stage 0b --steps "${STAGE0B_STEPS:-3000}" --lr 1e-3
stage 1 "$WORK/s0b" --stage 1 --steps "${STAGE1_STEPS:-300}" --lr 1e-3
stage 2 "$WORK/s1" --stage 2 --steps "${STAGE2_STEPS:-3000}" --lr 1e-3 --tune-vision-tower \
    "${MC_FOCUS[@]}" --focus-batch-size "${FOCUS2_BATCH:-16}" \
    --focus-weight "${FOCUS2_WEIGHT:-1}" --save-every 500
echo "training took ${SECONDS} s (scene generation and skipped stages not counted)"
score 2
