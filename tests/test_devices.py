"""What the backends do on a device they have not been measured on, checked on the CPU: the
torch backend's CUDA path (float32-output logits with an overlaid ``dz``, emulated), what
``"auto"`` picks on CUDA and why, exponentials that would underflow."""
import importlib
import json
import warnings

import pytest
import torch

import sftkey
from sftkey import config
from sftkey.core import driver

from conftest import assert_close, make_head, reads_gaps

torch_backend = importlib.import_module("sftkey.backends.torch")
products = importlib.import_module("sftkey.backends.products")


@pytest.fixture
def float32_output(monkeypatch):
    """The torch backend as on CUDA: float32-output products from bf16/fp16 operands (emulated
    from up-cast operands on the CPU), dW summed by float32-output addmm, and products that
    read a strided operand's row gap."""
    monkeypatch.setattr(torch_backend, "float32_output", lambda device_type, dtype: True)
    monkeypatch.setattr(products, "float32_sums", lambda device_type, dtype: True)
    monkeypatch.setattr(products, "mm_float32", lambda a, b, out: torch.mm(a.float(), b.float(), out=out))
    monkeypatch.setattr(products, "addmm_float32", lambda c, a, b: c.addmm_(a.float(), b.float()))
    monkeypatch.setattr(products, "DX", reads_gaps(products.DX))
    monkeypatch.setattr(config, "chunk_budget_bytes", 32 * 257 * 4)  # groups of 32 rows, blocks of 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(softcap=5.0, entropy_weights=0.1, label_smoothing=0.1),
                                     dict(reduction="none", z_loss=1e-3)], ids=["plain", "softcap+entropy", "none"])
def test_torch_backend_with_float32_output_products(dtype, options, float32_output):
    x, w, b, y = make_head(100, 40, 257, dtype, seed=3, bias=True)
    tw = torch.rand(100, generator=torch.Generator().manual_seed(4))
    op = torch_backend.TorchBackend()._setup(
        torch_backend.Head(x.detach(), w.detach(), None, y.clamp_min(-1), None, None), torch_backend.Needs(1, 1, 0),
        two_buffers=False)[0]
    assert op.float32_output and op.out.dtype == torch.float32 and op.group_rows < 100
    assert op.float32_sums and op.sum is not None and op.stage is None and op.stage_lo is None  # no unused staging
    got = sftkey.linear_cross_entropy(x, w, y, bias=b, token_weights=tw, backend="torch", **options)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = sftkey.linear_cross_entropy(x64, w64, y, bias=b64, token_weights=tw.double(), backend="reference", **options)
    upstream = torch.rand_like(want) if options.get("reduction") == "none" else torch.ones_like(want)
    grads = torch.autograd.grad(got, (x, w, b), upstream.to(got.dtype))
    want_grads = torch.autograd.grad(want, (x64, w64, b64), upstream)
    assert_close(got, want, dtype, "loss")
    for name, g, r in zip(("dx", "dw", "db"), grads, want_grads):
        assert torch.isfinite(g).all(), name
        assert_close(g, r, dtype, name)


def test_no_exponential_underflows():
    """A peaked softmax (logits hundreds apart): the block math's exponentials take no
    subnormal values (slow on many CPUs) and the loss and gradients stay exact."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 32, generator=g) * 8).requires_grad_()
    w = (torch.randn(500, 32, generator=g) * 8).requires_grad_()
    y = torch.randint(0, 500, (64,), generator=g)
    head = torch_backend.Head(x.detach(), w.detach(), None, y, None, None)
    op, blocks = torch_backend.TorchBackend()._setup(head, torch_backend.Needs(0, 0, 0), two_buffers=False)
    z = x.detach() @ w.detach().t()
    e = blocks.exp_shifted(z.clone(), z.amax(dim=1))
    tiny = torch.finfo(torch.float32).tiny
    assert (z - z.amax(dim=1, keepdim=True)).min() < -200  # the case underflows without the floor
    assert not ((e != 0) & (e.abs() < tiny)).any()
    for reduction in ("mean", "none"):
        got = sftkey.linear_cross_entropy(x, w, y, backend="torch", reduction=reduction)
        want = sftkey.linear_cross_entropy(x.double(), w.double(), y, backend="reference", reduction=reduction)
        assert_close(got, want, torch.float32, f"loss {reduction}")
        gx, gw = torch.autograd.grad(got.sum(), (x, w))
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        rx, rw = torch.autograd.grad(sftkey.linear_cross_entropy(x64, w64, y, backend="reference",
                                                                 reduction=reduction).sum(), (x64, w64))
        assert_close(gx, rx, torch.float32, f"dx {reduction}")
        assert_close(gw, rw, torch.float32, f"dw {reduction}")


@pytest.fixture
def a_gpu(monkeypatch, tmp_path):
    """A pretend CUDA device of compute capability 9.0 where the triton backend is usable, and
    an empty record file."""
    from sftkey.kernels import configs

    records = tmp_path / "verified.json"
    records.write_text(json.dumps({"records": []}))
    monkeypatch.setattr(configs, "RECORDS", records)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a pretend GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(driver, "triton_usable", lambda device: True)
    driver._verified_triton.cache_clear()
    yield records
    driver._verified_triton.cache_clear()


def _record(**changes) -> dict:
    import triton

    return {"capability": 90, "triton": triton.__version__, "torch": torch.__version__,
            "paths": ["triton", "triton-fused", "two-head"], **changes}


def test_auto_on_cuda_takes_triton_only_where_a_record_says_it_passed(a_gpu, monkeypatch):
    cuda = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="runs the torch backend on a pretend GPU: no record"):
        assert driver.resolve_backend("auto", cuda, torch.bfloat16).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert driver.resolve_backend("auto", cuda, torch.bfloat16).name == "torch"
    for record, triton_ok in ((_record(), True), (_record(capability=80), False), (_record(triton="2.0.0"), False),
                              (_record(paths=["triton", "two-head"]), False)):
        a_gpu.write_text(json.dumps({"records": [record]}))
        driver._verified_triton.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert (driver.resolve_backend("auto", cuda, torch.bfloat16).name == "triton") == triton_ok, record
    assert driver.resolve_backend("auto", cuda, torch.float64).name == "torch"  # the kernels take no float64


def test_the_committed_records_are_well_formed():
    from sftkey.kernels.configs import PATHS, RECORDS

    for record in json.loads(RECORDS.read_text())["records"]:
        assert {"capability", "triton", "torch", "paths", "gpu", "commit"} <= set(record), record
        assert set(record["paths"]) <= set(PATHS), record
