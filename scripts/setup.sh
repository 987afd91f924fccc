#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with torch, triton,
# transformers, the benchmark peers and sftkey itself (editable), ready for
# `.venv/bin/python -m bench` and `.venv/bin/python -m pytest`.
# Without a GPU, torch is pinned to 2.13.0, whose CPU build needs no CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # GPU machine: keep the image's CUDA torch and triton.
    [ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
    TORCH=(torch)
else
    [ -x .venv/bin/python ] || python3 -m venv .venv
    TORCH=(torch==2.13.0 "triton>=3.6,<3.10")
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "${TORCH[@]}" -e ".[test,bench,hf]"
# Optional benchmark peer; its own pins would pull another torch, so no dependencies.
"${PIP[@]}" --no-deps "cut-cross-entropy==25.1.1" || echo "setup: cut-cross-entropy not installed (benchmark peer skipped)"
