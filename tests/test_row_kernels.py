"""The Triton single pass (``backend="triton"``: torch.mm products, kernels/rows.py) against the
torch backend's block math and float64 autograd of materialized logits.

The loss is linear in the statistics, ``sum_i g_lse lse + g_zy zy + g_S S + g_Z Z`` with random
per-token coefficients, so its upstream gradients are known and every term of ``dz`` is
exercised alone and together. Compiled on CUDA, interpreted on the CPU (small shapes; the
interpreter's 64-column chunks leave a partial chunk at every V below), skipped elsewhere.
"""
import importlib
import warnings

import pytest
import torch

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE, needs_cuda, needs_kernels, reads_gaps  # noqa: E402
from sftkey import config  # noqa: E402
from sftkey.backends.engine import BlockResult, Needs, Reads, StatGrads  # noqa: E402
from sftkey.backends.products import float32_output  # noqa: E402
from sftkey.backends.triton import TritonBackend, logits_dtype  # noqa: E402
from sftkey.testing import assert_close  # noqa: E402
from test_triton_kernels import ALL, make, reference, upstream  # noqa: E402

rows_backend = importlib.import_module("sftkey.backends.triton")
torch_backend = importlib.import_module("sftkey.backends.torch")
products = importlib.import_module("sftkey.backends.products")

pytestmark = needs_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATS = ("lse", "target_logit", "expected_logit", "weighted_logit_sum")


class LinearLoss:
    """``sum_i sum_k coef_k[i] stat_k[i]`` over a block: its gradients are ``coef`` themselves."""

    def __init__(self, coef: StatGrads):
        self.coef = coef

    def __call__(self, block, stats):
        g = StatGrads(*(None if c is None else c[block] for c in self.coef))
        loss = sum((gi * getattr(stats, name)).sum() for gi, name in zip(g, STATS) if gi is not None)
        return BlockResult(loss, g)


@pytest.fixture(params=["inputs", "float32"])
def logits(request, monkeypatch):
    """The logits products in the inputs' dtype, or float32 from bf16/fp16 (dz then overlays
    them in a narrower dtype). Without ``torch.mm(out_dtype=)`` on the device (the CPU) the
    float32 products are emulated from up-cast operands."""
    if request.param == "float32" and not float32_output(KERNEL_DEVICE.type, torch.bfloat16):
        emulate_float32_output(monkeypatch)
    elif request.param == "inputs":
        monkeypatch.setattr(rows_backend, "float32_output", lambda device_type, dtype: False)
    return request.param


def emulate_float32_output(monkeypatch):
    """Float32 logits from bf16/fp16 operands where the device has no such product (the CPU)."""
    monkeypatch.setattr(rows_backend, "float32_output", lambda device_type, dtype: True)
    monkeypatch.setattr(products, "mm_float32", lambda a, b, out: torch.mm(a.float(), b.float(), out=out))


def run(head, coef, needs=ALL, reads=Reads(), backend=None):
    return (backend or TritonBackend()).single_pass(head, LinearLoss(coef), needs, reads)


def check(head, coef, needs=ALL, reads=Reads()):
    """The single pass against float64 autograd and against the torch backend's single pass."""
    got = run(head, coef, needs, reads)
    dtype = head.x.dtype
    float32_out = logits_dtype(head.x) == torch.float32
    stats_tol = torch.float32 if float32_out else dtype  # logits rounded to the inputs' dtype, or not
    ref = reference(head)
    for name, key in zip(STATS, ("lse", "zy", "S", "Z")):
        value = getattr(got.stats, name)
        read = {"expected_logit": reads.expected_logit, "weighted_logit_sum": reads.weighted_logit_sum}.get(name, True)
        if not read:
            assert value is None, name
            continue
        assert value.dtype == torch.float32, name
        assert_close(value, ref[key], stats_tol, name)
    if reads.argmax:
        z = ref["z"]
        assert_close(z.gather(1, got.stats.argmax[:, None])[:, 0], z.max(1).values, stats_tol, "argmax")
    else:
        assert got.stats.argmax is None
    want_loss = sum((c.double() * ref[k]).sum() for c, k in zip(coef, ("lse", "zy", "S", "Z")) if c is not None)
    assert_close(got.loss, want_loss, stats_tol, "loss")
    torch_result = run(head, coef, needs, reads, torch_backend.TorchBackend())
    for name, g, r, t, tr in zip(("dx", "dw", "db"), (got.dx, got.dw, got.db), reference(head, coef, needs),
                                 (head.x, head.w, head.b), (torch_result.dx, torch_result.dw, torch_result.db)):
        if r is None:
            assert g is None and tr is None, name
            continue
        assert g.dtype == t.dtype, name
        assert_close(g, r, dtype, name)
        assert_close(g, tr.double(), dtype, f"{name} against the torch backend")
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [dict(), dict(class_weights=True, softcap=3.0)], ids=["plain", "cw+softcap"])
def test_products_may_read_row_gaps(dtype, case, monkeypatch):
    """Float32 logits with ``dz`` overlaid in bf16/fp16 at their row stride: a product that
    reads the gap between ``dz``'s rows gets the same ``dX`` (the kernel zeroes the gap)."""
    if not float32_output(KERNEL_DEVICE.type, dtype):
        emulate_float32_output(monkeypatch)
    monkeypatch.setattr(products, "DX", reads_gaps(products.DX))
    head = make(dtype, **case)
    assert logits_dtype(head.x) == torch.float32
    check(head, upstream(head.x.shape[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(),
    dict(n=1, bias=False, ignore=False),
    dict(class_weights=True, softcap=3.0),
    dict(n=20, d=24, v=300, bias=False, class_weights=True),
    dict(n=13, d=40, v=7),
], ids=["plain", "n1", "cw+softcap", "v300", "v7"])
def test_single_pass(dtype, case, logits):
    if logits == "float32" and dtype == torch.float32:
        pytest.skip("float32 inputs have float32 products already")
    head = make(dtype, **case)
    check(head, upstream(head.x.shape[0]))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("which", [("lse",), ("zy",), ("S",), ("Z",), ("lse", "zy", "Z")], ids="+".join)
def test_each_term_of_dz(which, softcap):
    head = make(torch.float32, n=20, v=100, class_weights=True, softcap=softcap)
    check(head, upstream(20, which))


@pytest.mark.parametrize("needs", [Needs(True, False, False), Needs(False, True, False), Needs(False, False, True)],
                         ids=["dx", "dw", "db"])
def test_only_the_needed_gradients(needs):
    head = make(torch.bfloat16, n=20, v=100)
    check(head, upstream(20), needs)


@pytest.mark.parametrize("reads", [Reads(False, False, False), Reads(True, False, False), Reads(False, True, True)],
                         ids=["lse+zy", "S", "Z+argmax"])
def test_statistics_only_where_read(reads):
    head = make(torch.float32, n=20, v=100, class_weights=True)
    which = ("lse", "zy") + (("S",) if reads.expected_logit else ()) + (("Z",) if reads.weighted_logit_sum else ())
    check(head, upstream(20, which), reads=reads)


@pytest.mark.parametrize("sums", ["staged", "addmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_several_groups(dtype, logits, sums, monkeypatch):
    """Groups of 16 or 32 rows (a bf16 dW summed in the float32 buffer: through the staging
    slices, or by a float32-output addmm per group, emulated where the device lacks it), and
    gathered rows."""
    if dtype == torch.float32 and (logits == "float32" or sums == "addmm"):
        pytest.skip("float32 inputs have float32 products and sums already")
    if sums == "staged":
        monkeypatch.setattr(products, "float32_sums", lambda device_type, dtype: False)
    elif not products.float32_sums(KERNEL_DEVICE.type, dtype):
        monkeypatch.setattr(products, "float32_sums", lambda device_type, dtype: True)
        monkeypatch.setattr(products, "addmm_float32", lambda c, a, b: c.addmm_(a.float(), b.float()))
    monkeypatch.setattr(config, "chunk_budget_bytes", 16 * 300 * 4)
    head = make(dtype, n=150, d=16, v=300, class_weights=True)
    assert torch_backend.operand(head, ALL, logits_dtype(head.x), config.chunk_budget_bytes).group_rows < 150
    check(head, upstream(150))
    rows = torch.arange(0, 150, 2, device=KERNEL_DEVICE)
    gathered = type(head)(head.x, head.w, head.b, head.y[rows], head.c, None, rows)
    got = run(gathered, upstream(75))
    want = run(gathered.gathered(), upstream(75))
    assert_close(got.dx, gathered.scattered(want.dx).double(), dtype, "dx of gathered rows")
    assert_close(got.dw, want.dw.double(), dtype, "dw of gathered rows")


def test_loss_alone():
    head = make(torch.float16, n=20, v=100)
    got = run(head, upstream(20), Needs(False, False, False))
    assert got.dx is None and got.dw is None and got.db is None
    want = run(head, upstream(20))
    assert_close(got.loss, want.loss.double(), torch.float16, "loss")


def test_float64_refused():
    with pytest.raises(TypeError, match="float64"):
        run(make(torch.float64, n=4, d=16, v=40), upstream(4))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [dict(n=300, d=96, v=5000), dict(n=257, d=136, v=32003, softcap=30.0, class_weights=True)],
                         ids=["5000", "32003"])
def test_compiled_at_larger_shapes(dtype, case):
    """On a GPU: the compiled kernels (2048-column chunks) over partial chunks, real float32
    logits products where torch has them."""
    head = make(dtype, **case)
    check(head, upstream(head.x.shape[0]))


def _linear_loss_and_grads(head, backend):
    got = run(head, upstream(head.x.shape[0]), backend=backend)
    return got.loss, got.dx, got.dw, got.db


def test_out_of_resources_falls_back_to_torch_once_per_configuration(monkeypatch):
    """Triton's OutOfResources at a launch: one warning naming the reason, then the torch
    backend's results for that configuration; another configuration still tries its kernels."""
    from triton.runtime.errors import OutOfResources

    class Refuses:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(300 * 1024, 227 * 1024, "shared memory")
            return launch

    monkeypatch.setattr(importlib.import_module("sftkey.kernels.rows"), "row_stats_kernel", Refuses())
    head = make(torch.float32, n=20, v=100)
    backend = TritonBackend()
    with pytest.warns(RuntimeWarning, match="out of resource.*single_pass.*backend='torch'"):
        got = _linear_loss_and_grads(head, backend)
    want = _linear_loss_and_grads(head, torch_backend.TorchBackend())
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _linear_loss_and_grads(head, backend)
    with pytest.warns(RuntimeWarning, match="out of resource"):  # with a soft-cap: its own configuration
        _linear_loss_and_grads(make(torch.float32, n=20, v=100, softcap=3.0), backend)
    assert len(backend.refused) == 2


def test_unknown_gpu_falls_back_to_torch(monkeypatch):
    """A device without block shapes (an unknown GPU generation) runs the torch backend, warned."""
    sftkey_triton = importlib.import_module("sftkey.backends.triton_fused")
    monkeypatch.setattr(sftkey_triton, "known_gpu", lambda device: False)
    head = make(torch.float32, n=20, v=100)
    with pytest.warns(RuntimeWarning, match="no launch settings for"):
        got = TritonBackend().forward(head)
    assert torch.equal(got.lse, torch_backend.TorchBackend().forward(head).lse)


def test_group_budget_on_cuda_and_on_a_cpu(monkeypatch):
    """On CUDA a group holds at least ``4VD`` bytes when ``dW`` is summed, at most a sixteenth
    of the free memory, never less than the chunk budget; a frozen head (LoRA, no grad) keeps
    the chunk budget, and so does a CPU."""
    budget, gib = 1 << 20, 1 << 30
    assert torch_backend.device_budget(budget, 4 * gib, 80 * gib) == 4 * gib
    assert torch_backend.device_budget(budget, 4 * gib, 16 * gib) == gib
    assert torch_backend.device_budget(budget, 0, 80 * gib) == budget
    assert torch_backend.device_budget(budget, 4 * gib, budget) == budget
    monkeypatch.setattr(config, "chunk_budget_bytes", budget)
    head = make(torch.float32, n=20, v=100)
    assert torch_backend.group_budget(head, ALL) == budget
