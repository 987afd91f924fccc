#!/usr/bin/env bash
# The prepared device check: scripts/gpu-check.sh OUTDIR
#
# With a CUDA device (in under 8 minutes, with what the GPU image has: torch, triton, pytest):
#   1. installs the benchmark peers cut-cross-entropy and liger-kernel (--no-deps), nothing else;
#   2. the kernel tests compiled on the GPU (tests/test_row_kernels.py, tests/test_triton_kernels.py,
#      tests/test_divergence_triton.py,
#      the `gpu`-marked tests);
#   3. python -m sftkey.kernels.check for this GPU's compute capability (shared memory, spills);
#   4. python -m bench on the gpu-check preset's cases (Llama-3-8B and Gemma-2-2B at N=4096 and
#      16384, bf16, forward+backward), one run per model: sftkey's triton, triton-fused and torch
#      backends against eager PyTorch, torch.compile, torch's F.linear_cross_entropy, Cut
#      Cross-Entropy and Liger-Kernel.
# Each step has a timeout; together they stay under 8 minutes.
# Without one (dry mode): the kernel tests under the Triton interpreter, then "no GPU".
# Everything it writes goes to OUTDIR (summary.txt first); the exit status is that of the tests
# and the benchmark (0: all passed).
set -uo pipefail

OUT=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
START=$(date +%s)

log() { echo "[gpu-check +$(($(date +%s) - START))s] $*" | tee -a "$OUT/summary.txt"; }

# No install: the tree imports as it is (the link sftkey/kernels -> ../kernels is sftkey.kernels).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1  # Triton 3.9 warns without it; the default since 3.0

"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
EOF
cat "$OUT/environment.txt" >> "$OUT/summary.txt"

KERNEL_TESTS=(tests/test_row_kernels.py tests/test_triton_kernels.py tests/test_divergence_triton.py)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "dry mode: the kernel tests under the Triton interpreter"
    TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}" > "$OUT/tests.txt" 2>&1
    rc=$?
    log "interpreter tests: $(tail -n 1 "$OUT/tests.txt") (rc=$rc)"
    log "no GPU"
    exit $rc
fi

status=0
log "installing the benchmark peers (--no-deps)"
if ! timeout 50 "$PY" -m pip install --no-deps cut-cross-entropy liger-kernel > "$OUT/pip.txt" 2>&1; then
    log "peers not installed (pip.txt); the benchmark reports them as not installed"
fi

log "kernel tests, compiled on the GPU"
timeout -s INT -k 10 120 "$PY" -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}" > "$OUT/tests.txt" 2>&1
rc=$?
log "kernel tests: $(tail -n 1 "$OUT/tests.txt") (rc=$rc)"
[ $rc -eq 0 ] || status=1

CAP=$("$PY" -c "import torch; ma, mi = torch.cuda.get_device_capability(); print(ma * 10 + mi)")
log "compile-only check for sm_$CAP"
timeout 45 "$PY" -m sftkey.kernels.check "$CAP" --json "$OUT/compile-check.json" > "$OUT/compile-check.txt" 2>&1
rc=$?
log "compile check (rc=$rc): $(tr '\n' ';' < "$OUT/compile-check.txt" | tail -c 1500)"

# one run per model, so that a run cut short by its timeout leaves the other's results
for MODEL in Llama-3-8B Gemma-2-2B; do
    log "benchmark: $MODEL at N=4096 and 16384 (the gpu-check preset's cases), 4 s per implementation and case"
    timeout -s INT -k 10 110 "$PY" -m bench --model "$MODEL" --n 4096 16384 --dtype bf16 --repeats 3 --time-budget 4 \
        --impl sftkey-triton,sftkey-triton-fused,sftkey-torch,torch-eager,torch-compile,torch-lce,cce,liger \
        --out "$OUT/bench" > "$OUT/bench-$MODEL.txt" 2>&1
    rc=$?
    log "benchmark $MODEL rc=$rc (bench-$MODEL.txt, bench/)"
    [ $rc -eq 0 ] || status=1
done
log "done in $(($(date +%s) - START)) s, status $status"
exit $status
