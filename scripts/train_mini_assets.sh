#!/usr/bin/env bash
# Train the bundled mini models on the GPU machine in one call (< 10 min): build a world, train target and
# draft side by side on the one GPU (schedules fitted to the time left), score them on held-out clips, and
# leave the checkpoints as tarballs in $OUT (unpack them into assets/).
#   usage (device): [ROLES="target"] [INIT=1|DIR] [WORLD=DIR] [TRAIN_DIR=DIR] \
#                   bash scripts/train_mini_assets.sh [SECONDS_FOR_THE_WHOLE_SCRIPT]
# ROLES: which models to train (default both). INIT=1: continue the bundled models instead of starting from
# scratch (the world is then built with their tokenizer, so their token ids keep their meaning); INIT=DIR:
# continue DIR/mini-ROLE (a previous call's result). WORLD, TRAIN_DIR: where the world and the checkpoints go
# (default /tmp); put them under an ignored folder of the repo (e.g. .bench/) and a second call on the still-warm
# machine finds the world built (the build resumes: nothing to do) and can continue from TRAIN_DIR.
# TRAIN_CLIPS, CLIPS_PER_SEQ: the world's train split (default 5,200 clips, 2 per drive).
# FRESH=1 (target only): train on never-seen drives rendered on the fly by the spare CPU cores while the GPU
# trains (train-mini --fresh-scenes); the world then only needs its test split and a small train split.
# FRESH_WORKERS: how many processes render them (default all cores but two).
# CLIPS_PER_BATCH, QUESTIONS_PER_CLIP: one step's batch (default 64 x 2 answers).
# FRAME_SCALE: RGB frames at this multiple of the event sensor's size (world build --frame-scale, default 1);
# IMAGE_SIZE, PATCH_SIZE: a from-scratch model's vision input (e.g. 224 and 28 with FRAME_SCALE=2).
# ADD_VISION_LAYERS, ADD_LM_LAYERS (with INIT, target only): deepen the model first (layers that start as the
# identity: train-mini --add-vision-layers/--add-lm-layers).
# Two clips per drive (not the default 8): the answers describe the drive's scene, so what the models must
# generalise over is the number of distinct scenes; 2,600 train drives instead of 650 for ~1.3x the build time.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL=${1:-560}
RESERVE=${RESERVE:-80}  # visual-input preparation before training + held-out scoring + saving after it
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
ROLES=${ROLES:-"target draft"}
WORLD=${WORLD:-/tmp/world}; TRAIN_DIR=${TRAIN_DIR:-/tmp}; mkdir -p "$TRAIN_DIR"
tok=(); [ -n "${INIT:-}" ] && tok=(--tokenizer assets/mini-target/tokenizer.json)
python3 -m specalign world build --out "$WORLD" --train "${TRAIN_CLIPS:-5200}" --test 800 \
  --clips-per-sequence "${CLIPS_PER_SEQ:-2}" --frame-scale "${FRAME_SCALE:-1}" \
  --workers "$(nproc)" --no-mp4 --quiet "${tok[@]}" | tee "$OUT/world.txt"
echo "world built in $(( $(date +%s) - start )) s" | tee -a "$OUT/world.txt"
budget=$(( TOTAL - ($(date +%s) - start) - RESERVE ))
echo "training budget ${budget} s per model" | tee -a "$OUT/world.txt"
if [ "$budget" -lt 60 ]; then echo "too little time left to train; the world stays in $WORLD"; exit 0; fi
# --overwrite: a TRAIN_DIR/mini-ROLE of other settings (an earlier call) is trained over, not refused
common=(--world "$WORLD" --steps 100000 --time-budget "$budget" --eval-clips 100 --overwrite
  --clips-per-batch "${CLIPS_PER_BATCH:-64}" --questions-per-clip "${QUESTIONS_PER_CLIP:-2}" --quiet)
[ -n "${IMAGE_SIZE:-}" ] && common+=(--image-size "$IMAGE_SIZE" --patch-size "${PATCH_SIZE:-14}")
for role in $ROLES; do
  init=()
  if [ "${INIT:-}" = 1 ]; then
    init=(--init "mini-$role")
  elif [ -n "${INIT:-}" ]; then  # copied aside first: INIT may be TRAIN_DIR itself, whose mini-ROLE is rewritten
    rm -rf "$TRAIN_DIR/init-$role" && cp -r "$INIT/mini-$role" "$TRAIN_DIR/init-$role"
    rm -rf "$TRAIN_DIR/mini-$role"
    init=(--init "$TRAIN_DIR/init-$role")
  fi
  fresh=()  # only the target's clips can be rendered on the fly
  [ "$role" = target ] && [ -n "${FRESH:-}" ] && fresh=(--fresh-scenes)
  [ "$role" = target ] && [ -n "${FRESH_WORKERS:-}" ] && fresh+=(--fresh-workers "$FRESH_WORKERS")
  deepen=()  # only the target can be deepened
  [ "$role" = target ] && [ -n "${ADD_VISION_LAYERS:-}${ADD_LM_LAYERS:-}" ] && \
    deepen=(--add-vision-layers "${ADD_VISION_LAYERS:-0}" --add-lm-layers "${ADD_LM_LAYERS:-0}")
  python3 -m specalign models train-mini --role "$role" --out "$TRAIN_DIR/mini-$role" "${common[@]}" "${init[@]}" \
    "${fresh[@]}" "${deepen[@]}" \
    > "$OUT/train-$role.log" 2>&1 &
done
wait
tail -n 45 "$OUT"/train-*.log
for role in $ROLES; do
  rm -f "$TRAIN_DIR/mini-$role/train_state.pt"
  tar -C "$TRAIN_DIR" -cf "$OUT/mini-$role.tar" "mini-$role"
done
echo "total $(( $(date +%s) - start )) s"
