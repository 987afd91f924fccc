"""The torch backend's extra memory is bounded by its block budget, never proportional to
N x V: peak RSS of a forward+backward at N=4096, V=65536 (float32 logits: 1 GiB),
measured in a fresh subprocess (Linux: the peak is reset to the current RSS just before the
call, so the start-up's own peak does not count)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

N, D, V = 4096, 64, 65536
LOGITS_MIB = N * V * 4 / 2**20

SCRIPT = textwrap.dedent(f"""
    import json, torch, sftkey
    torch.manual_seed(0)
    x = torch.randn({N}, {D}, requires_grad=True)
    w = (torch.randn({V}, {D}) / 8).requires_grad_()
    y = torch.randint(0, {V}, ({N},))
    gx, gw = torch.empty_like(x), torch.empty_like(w)      # the gradients' own memory, counted as inputs
    tiny = sftkey.linear_cross_entropy(x[:8], w[:64], y[:8] % 64, backend="torch"); tiny.backward()
    x.grad = w.grad = None

    def status_mib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = status_mib("VmRSS:")
    loss = sftkey.linear_cross_entropy(x, w, y, backend=BACKEND, reduction=REDUCTION)
    loss.sum().backward()
    peak = status_mib("VmHWM:")
    print(json.dumps({{"extra_mib": peak - before, "loss": float(loss.sum())}}))
""")


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")


def measure(backend: str, reduction: str) -> dict:
    code = SCRIPT.replace("BACKEND", repr(backend)).replace("REDUCTION", repr(reduction))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_backend_extra_memory_bounded(reduction):
    """Single pass (mean) and recompute (none): extra memory under a tenth of the logits'
    size. The materializing reference is measured too, so the test is known to catch an
    N x V buffer."""
    got = measure("torch", reduction)
    print(f"torch backend, reduction={reduction}: {got['extra_mib']:.0f} MiB extra vs {LOGITS_MIB:.0f} MiB of logits")
    assert got["extra_mib"] < LOGITS_MIB / 10


@pytest.mark.slow
def test_measurement_sees_materialized_logits():
    ref = measure("reference", "mean")
    assert ref["extra_mib"] > LOGITS_MIB
