#!/usr/bin/env bash
# The Axolotl plugin (sftkey.integrations.axolotl) under a real `axolotl train` of a tiny local
# Llama on the CPU, in Axolotl's own venv .venv-axolotl: Axolotl 0.19.0 pins transformers 5.16.1,
# trl 1.9.0 and peft 0.20.0 and takes about 4.3 GB, so it cannot share .venv. The first run
# creates the venv (minutes); each `axolotl train` then takes 20 to 60 s on 2 cores.
# Not part of .ci/run (the venv alone would take a third of its budget): run it before a change
# to sftkey/integrations/{axolotl,trainer,transformers}.py or sftkey/methods/data.py lands.
#
#   scripts/check-axolotl.sh [--keep]     # --keep: leave the temporary folder (configs, outputs)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-axolotl
if [ ! -x "$VENV/bin/axolotl" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0 axolotl==0.19.0
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
export AXOLOTL_DO_NOT_TRACK=1   # without it the process hangs at exit on its telemetry
export TRL_EXPERIMENTAL_SILENCE=1
echo "check-axolotl: cpu $(lscpu | sed -n 's/^Model name: *//p'), family $(lscpu | sed -n 's/^CPU family: *//p')" \
     "model $(lscpu | sed -n 's/^Model: *//p'), $(nproc) cores"
"$VENV/bin/python" scripts/check_axolotl.py "$@"
