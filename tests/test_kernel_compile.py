"""Every kernel compiles for every GPU generation of kernels/configs.py, on any machine: Triton's
compiler for a ``GPUTarget`` and its bundled ptxas, in a subprocess without the interpreter
(``python -m sftkey.kernels.check``): no register spills, shared memory within the budget."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from sftkey.backends.engine import MAX_TOPK  # noqa: E402
from sftkey.kernels.configs import GENERATIONS, TILE_TOPK  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(triton, "knobs"), reason="this Triton has no triton.knobs (ptxas path)")]


@pytest.mark.parametrize("capability", sorted(GENERATIONS))
def test_kernels_compile_within_budget(capability, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "sftkey.kernels.check", str(capability), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    assert out.exists(), proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # forward (16 and 32 top-k logits) and backward in bf16 and fp32, the two row kernels, the two pair kernels
    assert len(rows) == 10, rows
    bad = [r for r in rows if not r["ok"]]
    assert not bad, f"sm_{capability}: {bad}"
    assert proc.returncode == 0, proc.stdout


def test_the_check_covers_the_most_top_k_logits():
    """The check compiles the forward at ``2 * TILE_TOPK`` top-k logits: the API's most."""
    assert MAX_TOPK <= 2 * TILE_TOPK
