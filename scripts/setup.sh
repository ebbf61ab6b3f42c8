#!/usr/bin/env bash
# Set up impasto on a fresh machine: a virtualenv in .venv, the pinned packages (torch's CPU
# build), the protobuf code generated from proto/, and both distributions installed editable.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first and pinned: an open range would pull a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "grpcio-tools==1.85.1"
.venv/bin/python scripts/gen_proto.py
"${PIP[@]}" -e clients/python -e ".[dev,compile,lora]"
.venv/bin/python -c "import impasto, impasto_client, torch, diffusers; print('impasto set up: torch', torch.__version__, '| diffusers', diffusers.__version__)"
