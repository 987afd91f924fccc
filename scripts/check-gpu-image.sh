#!/usr/bin/env bash
# The lent GPU machines' versions on the CPU (Python 3.12, torch 2.11, triton 3.6, transformers
# 5.17: the H200 image's), in .venv-gpu-image, from scripts/constraints-gpu-image.txt: the compile-only
# check of every kernel for every GPU generation, then the kernel, API and Hugging Face tests
# (the kernels under the Triton interpreter). .ci/run runs it after the README's test command.
#
#   scripts/check-gpu-image.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-gpu-image
if [ ! -x "$VENV/bin/python" ]; then
    PY=python3  # the image's Python is 3.12: take it where this machine has one (pyenv's too)
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if "$candidate" --version >/dev/null 2>&1; then PY=$candidate; break; fi
    done
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -c scripts/constraints-gpu-image.txt torch triton transformers accelerate pytest numpy setuptools
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import torch, triton, transformers
import platform
print('gpu-image leg: python', platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

TESTS=(tests/test_row_kernels.py tests/test_triton_kernels.py tests/test_divergence_triton.py tests/test_api.py
       tests/test_parity.py tests/test_integration_transformers.py tests/test_packaging.py)
[ $# -eq 0 ] || TESTS=("$@")
status=0
"$VENV/bin/python" -m sftkey.kernels.check || status=$?
"$VENV/bin/python" -m pytest -p no:cacheprovider -W "ignore:Conversion of an array with ndim:DeprecationWarning" "${TESTS[@]}" || status=$?
exit $status
