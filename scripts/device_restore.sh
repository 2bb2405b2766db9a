#!/usr/bin/env bash
# After a device call: put the shipped models back and turn the returned snapshot into a resumable
# snapshot of RUN (fresh optimiser state), then continue here with --resume RUN.
#
#   bash scripts/device_restore.sh FILES_AT RUN
set -euo pipefail
cd "$(dirname "$0")/.."
returned=${1:?usage: device_restore.sh FILES_AT RUN}
run=${2:?usage: device_restore.sh FILES_AT RUN}
py=${PYTHON:-.venv/bin/python}
if [ -d .models-aside ] && [ ! -d src/portrait3d/models ]; then mv .models-aside src/portrait3d/models; fi
"$py" -m portrait3d.interfaces.cli train unpack-snapshot "$returned/snapshot" "$run"
