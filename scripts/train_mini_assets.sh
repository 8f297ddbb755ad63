#!/usr/bin/env bash
# Train the bundled mini models on the GPU machine in one call (< 10 min): build the default world,
# train target and draft side by side on the one GPU, score them on held-out clips, run the GPU tests,
# and leave the checkpoints as tarballs in $OUT (unpack them into assets/).
#   usage (device): bash scripts/train_mini_assets.sh [TIME_BUDGET_SECONDS]
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${1:-320}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
python3 -m specalign world build --out /tmp/world --test 800 --workers "$(nproc)" --no-mp4 --quiet | tee "$OUT/world.txt"
echo "world built in $(( $(date +%s) - start )) s" | tee -a "$OUT/world.txt"
# the recipe of the bundled assets (lr 1e-3, 2606 and 1864 steps); BUDGET is a hard cap in seconds
python3 -m specalign models train-mini --role target --world /tmp/world --out /tmp/mini-target --steps 2606 \
  --time-budget "$BUDGET" --eval-clips 100 --quiet > "$OUT/train-target.log" 2>&1 &
python3 -m specalign models train-mini --role draft --world /tmp/world --out /tmp/mini-draft --steps 1864 \
  --time-budget "$BUDGET" --eval-clips 100 --quiet > "$OUT/train-draft.log" 2>&1 &
wait
tail -n 30 "$OUT"/train-*.log
for role in target draft; do tar -C /tmp -cf "$OUT/mini-$role.tar" "mini-$role"; done
SPECALIGN_ASSETS=/tmp python3 -m pytest -q -m gpu tests/models -p no:cacheprovider 2>&1 | tail -n 15 | tee "$OUT/gpu-tests.txt"
echo "total $(( $(date +%s) - start )) s"
