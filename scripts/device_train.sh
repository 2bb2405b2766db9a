#!/usr/bin/env bash
# On the lent accelerator (run from the repository root, with .device carried): resume the packed
# snapshot, train for MINUTES (default 7) in bf16 on the GPU, and pack the result into $OUT/snapshot.
#
#   device run: bash scripts/device_train.sh      carry: [".device"]   timeout_s: 590
#
# Environment: MINUTES (7), BATCH (64), RESOLUTION (the snapshot's, 128), DEVICE (cuda), PRESET (cpu-proj).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/.device" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/p3d-out}
work=$(mktemp -d)
python3 -m portrait3d.interfaces.cli dataset unpack .device/faces.npz "$work/data"
python3 -m portrait3d.interfaces.cli train unpack-snapshot .device/snapshot "$work/run"
python3 -m portrait3d.interfaces.cli train stylegan2 --data "$work/data" --out "$work/run" --resume "$work/run" \
    --config "${PRESET:-cpu-proj}" --resolution "${RESOLUTION:-128}" --device "${DEVICE:-cuda}" --no-amp \
    --precision bf16 --batch "${BATCH:-64}" --kimg 1000000 --snap 1000000 --sample-every 1000000 \
    --max-minutes "${MINUTES:-7}" --workers 4 --no-progress
python3 -m portrait3d.interfaces.cli train pack-snapshot "$work/run" "$out/snapshot"
cp "$work/run/log.jsonl" "$out/log.jsonl"
