#!/usr/bin/env bash
# The prepared device check: scripts/gpu-check.sh OUTDIR
#
# On a bare GPU machine (the lent H200's image: torch, triton, pytest; no network, nothing is
# installed), in at most 9 minutes of wall time:
#   1. each Triton path's tests, compiled on the GPU, one pytest run per path (each with its
#      timeout): "triton" (the single pass's row kernels, tests/test_row_kernels.py, and the
#      parity grid on backend="triton"), "triton-fused" (tests/test_triton_kernels.py and the
#      parity grid on "triton-fused"), "two-head" (tests/test_divergence_triton.py);
#   2. python -m sftkey.kernels.check for this GPU's compute capability (shared memory, spills);
#   3. python -m bench --preset gpu-check (Llama-3-8B and Gemma-2-2B at N=4096 and 16384, bf16,
#      forward+backward): sftkey's triton, triton-fused and torch backends against eager PyTorch,
#      torch.compile, torch's F.linear_cross_entropy, and Cut Cross-Entropy and Liger-Kernel
#      where the image has them (an absent peer is reported as skipped, with the reason).
# Everything goes to OUTDIR, seven files at most: summary.txt (first), tests.txt, compile-check.json,
# verified.json (the record of the paths that passed: add it to kernels/verified.json's "records"
# and commit, which lets backend="auto" take them on this GPU generation), and the benchmark's
# JSON, Markdown and plot. Without a GPU (dry mode): the kernel tests under the Triton
# interpreter, then "no GPU". The exit status is that of the tests and the benchmark (0: all passed).
set -uo pipefail

OUT=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
START=$(date +%s)
# No install: the tree imports as it is (the link sftkey/kernels -> ../kernels is sftkey.kernels).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1  # Triton 3.9 warns without it; the default since 3.0

log() { echo "[gpu-check +$(($(date +%s) - START))s] $*" | tee -a "$OUT/summary.txt"; }

if ! "$PY" -c "import torch" 2>> "$OUT/summary.txt"; then
    log "$PY cannot import torch (set PYTHON to the interpreter that has it)"
    exit 2
fi

"$PY" - >> "$OUT/summary.txt" 2>&1 <<'EOF'
import importlib, platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "transformers", "cut_cross_entropy", "liger_kernel"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except ImportError as e:
        print(name, "absent:", e)
print("commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
EOF

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "dry mode: the kernel tests under the Triton interpreter"
    TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_row_kernels.py tests/test_triton_kernels.py \
        tests/test_divergence_triton.py > "$OUT/tests.txt" 2>&1
    rc=$?
    log "interpreter tests: $(tail -n 1 "$OUT/tests.txt") (rc=$rc)"
    log "no GPU"
    exit $rc
fi

status=0
passed=()
run_path() {  # run_path NAME TIMEOUT PYTEST-ARGS...
    local name=$1 limit=$2; shift 2
    echo "=== $name: pytest $*" >> "$OUT/tests.txt"
    timeout -s INT -k 10 "$limit" "$PY" -m pytest -q -p no:cacheprovider "$@" >> "$OUT/tests.txt" 2>&1
    local rc=$?
    log "path $name: $(tail -n 1 "$OUT/tests.txt") (rc=$rc)"
    if [ $rc -eq 0 ]; then passed+=("$name"); else status=1; fi
}
run_path triton 100 tests/test_row_kernels.py tests/test_parity.py -k "row_kernels or (parity and triton and not fused)"
run_path triton-fused 100 tests/test_triton_kernels.py tests/test_parity.py -k "triton_kernels or (parity and fused)"
run_path two-head 80 tests/test_divergence_triton.py

CAP=$("$PY" -c "import torch; ma, mi = torch.cuda.get_device_capability(); print(ma * 10 + mi)")
log "compile-only check for sm_$CAP"
timeout 40 "$PY" -m sftkey.kernels.check "$CAP" --json "$OUT/compile-check.json" >> "$OUT/summary.txt" 2>&1
log "compile check rc=$?"

PASSED="${passed[*]}" "$PY" - > "$OUT/verified.json" <<'EOF'
import datetime, json, os, subprocess, torch, triton
p = torch.cuda.get_device_properties(0)
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
print(json.dumps({"gpu": p.name, "capability": p.major * 10 + p.minor, "torch": torch.__version__,
                  "triton": triton.__version__, "commit": commit, "date": datetime.date.today().isoformat(),
                  "paths": os.environ["PASSED"].split()}, indent=1))
EOF
log "verified paths: ${passed[*]:-none} (verified.json)"

log "benchmark: the gpu-check preset, 4 s per implementation and case"
timeout -s INT -k 10 200 "$PY" -m bench --preset gpu-check --dtype bf16 --repeats 3 --time-budget 4 \
    --impl sftkey-triton,sftkey-triton-fused,sftkey-torch,torch-eager,torch-compile,torch-lce,cce,liger \
    --out "$OUT" >> "$OUT/summary.txt" 2>&1
rc=$?
log "benchmark rc=$rc"
[ $rc -eq 0 ] || status=1
log "done in $(($(date +%s) - START)) s, status $status"
exit $status
