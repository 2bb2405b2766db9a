#!/usr/bin/env bash
# On the lent accelerator (run from the repository root, with .device carried): resume the packed
# snapshot (StyleGAN2 or EG3D, as device_prepare.sh packed it), train for MINUTES (default 7) in bf16 on the
# GPU, and pack the result into $OUT/snapshot.
#
#   device run: bash scripts/device_train.sh      carry: [".device"]   timeout_s: 590
#
# Environment: MINUTES (7), BATCH (64 for StyleGAN2, 32 for EG3D), RESOLUTION (StyleGAN2: the snapshot's, 128),
# DEVICE (cuda), PRESET (cpu-proj), EXTRA (more trainer options, e.g. for EG3D
# "--discriminator projected --blur-fade 0 --distill-weight 0.5 --distill-depth-weight 30 --distill-spread-weight 5").
# An EG3D run distils from .device/teacher.npz when device_prepare.sh packed one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/.device" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/p3d-out}
work=$(mktemp -d)
cli=(python3 -m portrait3d.interfaces.cli)
trainer=$(python3 -c "import json; print(json.load(open('.device/snapshot/run.json'))['trainer'])")
"${cli[@]}" dataset unpack .device/faces.npz "$work/data"
"${cli[@]}" train unpack-snapshot .device/snapshot "$work/run"
common=(--data "$work/data" --out "$work/run" --resume "$work/run" --config "${PRESET:-cpu-proj}"
        --device "${DEVICE:-cuda}" --no-amp --precision bf16 --kimg 1000000 --snap 1000000 --sample-every 1000000
        --max-minutes "${MINUTES:-7}" --workers 4 --no-progress)
# EXTRA is split into words on purpose: it holds options
# shellcheck disable=SC2206
extra=(${EXTRA:-})
if [ "$trainer" = eg3d ]; then
    distill=()
    if [ -f .device/teacher.npz ]; then
        "${cli[@]}" train unpack-teacher .device/teacher.npz "$work/teacher"
        distill=(--distill "$work/teacher")
    fi
    "${cli[@]}" train eg3d "${common[@]}" --batch "${BATCH:-32}" "${distill[@]}" "${extra[@]}"
else
    "${cli[@]}" train stylegan2 "${common[@]}" --batch "${BATCH:-64}" --resolution "${RESOLUTION:-128}" "${extra[@]}"
fi
"${cli[@]}" train pack-snapshot "$work/run" "$out/snapshot"
cp "$work/run/log.jsonl" "$out/log.jsonl"
