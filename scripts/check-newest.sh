#!/usr/bin/env bash
# The whole test suite against the newest release of every dependency but torch (the registry's
# only CPU build is 2.13.0; newer wheels pull the CUDA packages), in a fresh .venv-newest.
# Run it before a change lands on main. When it fails, fix the code, not the pin; when it
# passes, `--update` writes the versions it ran with to scripts/constraints.txt (what
# scripts/setup.sh, the README's commands and CI install).
#
# `--torch` takes the newest torch too (its default wheel and the CUDA packages, several GB;
# the suite runs on the CPU all the same), in .venv-newest-torch; `--update` does not apply to it.
#
#   scripts/check-newest.sh [--update | --torch] [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

UPDATE=0
TORCH=torch==2.13.0
VENV=.venv-newest
case "${1:-}" in
    --update) UPDATE=1; shift ;;
    --torch) TORCH=torch; VENV=.venv-newest-torch; shift ;;
esac
rm -rf "$VENV"
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch stays what $TORCH says through every upgrade (an eager upgrade would otherwise take the
# newest torch, whose default wheel pulls the CUDA packages)
TORCH_PIN=$VENV/torch-pin.txt
echo "$TORCH" > "$TORCH_PIN"
"${PIP[@]}" -c "$TORCH_PIN" --upgrade torch
"${PIP[@]}" -c "$TORCH_PIN" --upgrade --upgrade-strategy eager triton -e ".[test,bench,hf]"
"${PIP[@]}" -c "$TORCH_PIN" --upgrade --no-deps cut-cross-entropy
"$VENV/bin/python" -c "import torch, triton; print('check-newest: torch', torch.__version__, 'triton', triton.__version__)"

FREEZE=$VENV/constraints.txt
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^sftkey' | sed 's/^torch==\(.*\)+cpu$/torch==\1/' \
    | LC_ALL=C sort -f > "$FREEZE"
echo "check-newest: versions that differ from scripts/constraints.txt (< pinned, > newest):"
{ diff <(grep -v '^#' scripts/constraints.txt | LC_ALL=C sort -f) "$FREEZE" || true; } | grep '^[<>]' || echo "  none"

status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
echo "check-newest: pytest exit status $status"
if [ $status -eq 0 ] && [ $UPDATE -eq 1 ]; then
    { grep '^#' scripts/constraints.txt; cat "$FREEZE"; } > scripts/constraints.txt.new
    mv scripts/constraints.txt.new scripts/constraints.txt
    echo "check-newest: scripts/constraints.txt updated"
fi
exit $status
