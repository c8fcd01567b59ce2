#!/usr/bin/env bash
# Creates .venv at the repository root and installs fastattr into it, editable, with every extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[onnx,bench,dev,serve,ray,triton,kserve]'
echo "fastattr installed in .venv: $(.venv/bin/python -c 'import fastattr, torch; print(fastattr.__version__, "with torch", torch.__version__)')"
