#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with torch, triton,
# transformers, the benchmark peers and sftkey itself (editable), ready for
# `.venv/bin/python -m bench` and `.venv/bin/python -m pytest`.
# Versions come from scripts/constraints.txt, those the suite last passed with, so a new
# release upstream cannot break a set-up (scripts/check-newest.sh tries the newest ones).
# Without a GPU, torch is 2.13.0, whose CPU build needs no CUDA packages; on a GPU machine the
# image's torch and triton stay and the constraints apply to the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

CONSTRAINTS=scripts/constraints.txt
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    [ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
    CONSTRAINTS=$(mktemp)
    trap 'rm -f "$CONSTRAINTS"' EXIT
    grep -vE '^(torch|triton)==' scripts/constraints.txt > "$CONSTRAINTS"
    TORCH=(torch)
else
    [ -x .venv/bin/python ] || python3 -m venv .venv
    TORCH=(torch triton)
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS")
"${PIP[@]}" "${TORCH[@]}" -e ".[test,bench,hf]"
# Optional benchmark peer; its own pins would pull another torch, so no dependencies.
"${PIP[@]}" --no-deps cut-cross-entropy || echo "setup: cut-cross-entropy not installed (benchmark peer skipped)"
