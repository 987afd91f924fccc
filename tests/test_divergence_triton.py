"""``sftkey.linear_divergence`` and ``linear_cross_entropy``'s ``anchor`` on ``backend="triton"``
(the two-head pass with the block math of kernels/pair_rows.py) against the float64 oracle:
forward and reverse KL, every reduction, the kernels' dtypes, the odd shapes of
tests/test_divergence.py (N=1, V not a multiple of the block, D_ref != D) in several groups,
ignored tokens, zero weights, temperature, ``shift``, gradients to both heads. Compiled on
CUDA, interpreted on the CPU (tiny shapes), skipped elsewhere."""
import pytest
import torch

pytest.importorskip("triton")

import importlib  # noqa: E402

import sftkey  # noqa: E402
from sftkey.core.driver import resolve_backend  # noqa: E402

triton_backend = importlib.import_module("sftkey.backends.triton")

from conftest import DEVICE, needs_cuda, needs_kernels  # noqa: E402
from test_divergence import SHAPES, REDUCTIONS, _compare, _divergence, _pair, small_groups  # noqa: E402,F401

pytestmark = needs_kernels

KINDS = ("forward_kl", "reverse_kl")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many blocks went through the triton rows (so that a pass cannot quietly run on torch)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return rows(*args, **kwargs)

    rows = triton_backend.kl_rows
    monkeypatch.setattr(triton_backend, "kl_rows", counted)
    return calls


def _anchored(t, y, backend, **kw):
    return sftkey.linear_cross_entropy(t[0], t[1], y, bias=t[2], anchor=(t[3], t[4], t[5]), backend=backend, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-D{s[1]}-Dr{s[2]}-V{s[3]}")
def test_every_kind_and_reduction_matches_the_oracle(kind, reduction, shape, small_groups, kernel_calls):
    tensors, y, g = _pair(*shape, torch.float32, seed=len(kind) * 5 + len(reduction) + shape[3])
    tw = torch.rand(y.shape, generator=g).to(DEVICE)
    upstream = torch.randn(y.shape, generator=g).to(DEVICE) if reduction == "none" else None
    _compare(_divergence, tensors, y, torch.float32, upstream, backend="triton", kind=kind, reduction=reduction,
             token_weights=tw, temperature=1.7, ref_grad=True, what=f"{kind} {reduction}")
    assert kernel_calls and set(kernel_calls) == {kind}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_every_dtype(kind, dtype, small_groups, kernel_calls):
    tensors, y, _ = _pair((2, 9), 12, 20, 131, dtype, seed=23)
    _compare(_divergence, tensors, y, dtype, backend="triton", kind=kind, temperature=0.7, what=f"{kind} {dtype}")
    assert kernel_calls


@pytest.mark.parametrize("kind", KINDS)
def test_ignored_tokens_zero_weights_shift_and_normalizer(kind, kernel_calls):
    tensors, y, g = _pair((3, 7), 12, 20, 67, torch.float32, seed=24, ignore_frac=0.5)
    _compare(_divergence, tensors, y, torch.float32, backend="triton", kind=kind, shift=True, normalizer=5.0,
             what="shift, normalizer")
    tw = torch.zeros(y.shape, device=DEVICE)
    tw[0, 2], tw[2, 5] = 2.0, 0.5
    _compare(_divergence, tensors, y, torch.float32, backend="triton", kind=kind, token_weights=tw,
             reduction="sum", what="two weighted tokens")
    x, w, b, xr, wr, br = tensors
    loss = sftkey.linear_divergence(x, w, xr, wr, torch.full_like(y, -100), bias=b, ref_bias=br, kind=kind,
                                    backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and float(x.grad.abs().max()) == 0.0
    assert kernel_calls


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ({"dft": True}, {"softcap": 4.0, "label_smoothing": 0.1}),
                         ids=("dft", "softcap-smoothing"))
@pytest.mark.parametrize("kind", KINDS)
def test_anchored_cross_entropy(kind, options, reduction, small_groups, kernel_calls):
    tensors, y, g = _pair((2, 9), 12, 20, 131, torch.float32, seed=25)
    tw = torch.rand(y.shape, generator=g).to(DEVICE)
    tw.view(-1)[3] = 0
    upstream = torch.randn(y.shape, generator=g).to(DEVICE) if reduction == "none" else None

    _compare(_anchored, tensors, y, torch.float32, upstream, backend="triton", anchor_weight=0.3, anchor_kind=kind,
             token_weights=tw, reduction=reduction, what=f"anchored {kind}", **options)
    assert kernel_calls and set(kernel_calls) == {kind}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_anchored_cross_entropy_in_every_dtype(dtype, small_groups, kernel_calls):
    tensors, y, _ = _pair((2, 9), 12, 20, 131, dtype, seed=26)

    _compare(_anchored, tensors, y, dtype, backend="triton", dft=True, anchor_weight=0.1, what=f"anchored {dtype}")
    assert kernel_calls


def test_what_the_triton_rows_refuse():
    tensors, y, _ = _pair((6,), 8, 8, 11, torch.float32, seed=27)
    x, w, b, xr, wr, br = tensors
    with pytest.raises(ValueError, match="kind='jsd' has no triton kernels"):
        sftkey.linear_divergence(x, w, xr, wr, y, kind="jsd", backend="triton")
    with pytest.raises(ValueError, match="anchor_kind='jsd' has no triton kernels"):
        sftkey.linear_cross_entropy(x, w, y, anchor=(xr, wr), anchor_kind="jsd", backend="triton")
    x64, w64, xr64, wr64 = (t.detach().double() for t in (x, w, xr, wr))
    with pytest.raises(TypeError, match="backend='triton' supports float32, bfloat16 and float16 inputs"):
        sftkey.linear_divergence(x64, w64, xr64, wr64, y, backend="triton")
    with pytest.raises(TypeError, match="backend='triton' supports float32"):
        resolve_backend("triton", DEVICE, torch.float32).two_head_rows("forward_kl", torch.float64, DEVICE)


def _rows(backend: str, kind: str, dtype=torch.float32):
    """The triton backend's two-head rows for ``kind``, where the call's backend has them, else None."""
    return resolve_backend(backend, DEVICE, dtype).two_head_rows(kind, dtype, DEVICE)


def test_which_calls_take_the_row_kernels():
    """``"triton"`` for the KLs; ``"torch"`` never; ``"auto"`` where it picks the triton backend
    (on CUDA), and never for the JSD or float64."""
    assert _rows("triton", "forward_kl") is not None and _rows("triton", "reverse_kl") is not None
    assert _rows("triton", "jsd") is None and _rows("torch", "forward_kl") is None
    assert _rows("auto", "jsd") is None and _rows("auto", "forward_kl", torch.float64) is None
    assert (_rows("auto", "forward_kl") is not None) == (DEVICE.type == "cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_at_a_larger_shape_through_auto(kind, kernel_calls):
    """Compiled kernels over many rows and a vocabulary of several blocks, chosen by ``"auto"``."""
    tensors, y, g = _pair((4, 75), 64, 48, 5003, torch.bfloat16, seed=28)
    tw = torch.rand(y.shape, generator=g).to(DEVICE)
    _compare(_divergence, tensors, y, torch.bfloat16, backend="auto", kind=kind, token_weights=tw, temperature=2.0,
             ref_grad=True, what=f"compiled {kind}")
    assert kernel_calls
