"""The backends' extra memory is bounded by their blocks, never proportional to N x V: peak
RSS of a forward+backward in a fresh subprocess (Linux: the peak is reset to the current RSS
just before the call, so the start-up's own peak does not count). The materializing
reference is measured the same way, so the measurement is known to catch an N x V buffer."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sftkey import config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")]

SCRIPT = textwrap.dedent("""
    import json, sys, torch, sftkey
    backend, reduction, n, d, v = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    if backend.startswith("triton"):  # big interpreter tiles: few programs, so the interpreter is quick
        from sftkey.core.driver import resolve_backend
        from sftkey.kernels.configs import KernelConfig, RowConfig
        be = resolve_backend(backend, torch.device("cpu"), torch.float32)
        be.forward_config = be.backward_config = KernelConfig(block_n=64, block_v=256, block_d=16)
        be.row_config = RowConfig(block_v=4096, num_warps=1)
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d ** 0.5).requires_grad_()
    y = torch.randint(0, v, (n,))
    sftkey.linear_cross_entropy(x[:8], w[:300], y[:8] % 300, backend=backend).backward()
    x.grad = w.grad = None

    def status_mib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = status_mib("VmRSS:")
    loss = sftkey.linear_cross_entropy(x, w, y, backend=backend, reduction=reduction)
    loss.sum().backward()
    print(json.dumps({"extra_mib": status_mib("VmHWM:") - before}))
""")

TORCH_SHAPE = (4096, 64, 65536)    # float32 logits: 1 GiB
TRITON_SHAPE = (512, 16, 16384)    # float32 logits: 32 MiB (the interpreter is slow)


def logits_mib(shape) -> float:
    n, _, v = shape
    return n * v * 4 / 2**20


def extra_mib(backend: str, reduction: str, shape, chunk_mib: float = config.chunk_budget_bytes / 2**20) -> float:
    # a fixed mmap threshold: every large buffer is mapped and unmapped, so the peak resident set
    # is the live peak (glibc's sliding threshold otherwise keeps freed groups resident)
    env = dict(os.environ, TRITON_INTERPRET="1", MALLOC_MMAP_THRESHOLD_=str(1 << 20), SFTKEY_CHUNK_MIB=str(chunk_mib))
    args = [sys.executable, "-c", SCRIPT, backend, reduction, *map(str, shape)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=True, env=env)
    extra = json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]
    print(f"{backend}, reduction={reduction}, (N, D, V)={shape}: {extra:.1f} MiB extra vs "
          f"{logits_mib(shape):.0f} MiB of logits")
    return extra


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_backend_extra_memory_bounded(reduction):
    """Single pass (mean) and recompute (none): within twice the chunk budget (one group, its
    float32 blocks, the gradients' float32 sums), 10x below the logits' size."""
    budget_mib = config.chunk_budget_bytes / 2**20
    assert 2 * budget_mib < logits_mib(TORCH_SHAPE) / 10
    assert extra_mib("torch", reduction, TORCH_SHAPE) < 2 * budget_mib


def test_fused_triton_backend_under_interpreter_allocates_no_logits():
    """The fused kernels hold no N x V buffer (dW's float32 buffer is 1 MiB here)."""
    pytest.importorskip("triton")
    assert extra_mib("triton-fused", "mean", TRITON_SHAPE) < logits_mib(TRITON_SHAPE) / 4


def test_triton_single_pass_holds_one_group():
    """The Triton single pass holds one group of logits within the chunk budget (2 MiB here, of
    32 MiB of logits), and the gradients."""
    pytest.importorskip("triton")
    assert extra_mib("triton", "mean", TRITON_SHAPE, chunk_mib=2) < logits_mib(TRITON_SHAPE) / 4


@pytest.mark.parametrize("shape", [TORCH_SHAPE, TRITON_SHAPE], ids=["torch-shape", "triton-shape"])
def test_measurement_sees_materialized_logits(shape):
    assert extra_mib("reference", "mean", shape) > logits_mib(shape)
