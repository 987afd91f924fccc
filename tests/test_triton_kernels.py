"""FusedTritonBackend (sftkey.kernels' fused tile kernels) against float64 materialized logits
and torch autograd.

Compiled on CUDA; on the CPU through Triton's interpreter (tests/conftest.py switches it on
before triton is imported), so shapes are small; the interpreter's block shapes (16 x 32 x
32) leave partial tiles on every axis at V = 257 and D = 40. Skipped where neither runs.
"""
import pytest
import torch

pytest.importorskip("triton")

from conftest import KERNEL_DEVICE, needs_kernels  # noqa: E402
from sftkey.backends.engine import MAX_TOPK, Head, Needs, StatGrads  # noqa: E402
from sftkey.backends.triton_fused import FusedTritonBackend  # noqa: E402
from sftkey.kernels.configs import INTERPRETED, INTERPRETER, tile_args  # noqa: E402
from sftkey.testing import assert_close  # noqa: E402

pytestmark = needs_kernels

# Tolerances are sftkey.testing's: statistics accumulate in float32 from the (exact) input
# values for every dtype, so they are held to float32's; gradients go through dz rounded to
# the input dtype before the products, and are held to that dtype's.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL = Needs(True, True, True)


def make(dtype, n=37, d=40, v=257, bias=True, class_weights=False, ignore=True, softcap=None,
         scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * scale / d ** 0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if ignore:
        y[::5] = -1
    c = torch.rand(v, generator=g) + 0.5 if class_weights else None
    x, w, b, y, c = (None if t is None else t.to(KERNEL_DEVICE) for t in (x, w, b, y, c))
    return Head(x, w, b, y, c, softcap)


def upstream(n, which="all", seed=1):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g).to(KERNEL_DEVICE) for _ in range(4)]
    return StatGrads(*(gr if which == "all" or k in which else None
                       for k, gr in zip(("lse", "zy", "S", "Z"), grads)))


def reference(head, grads=None, needs=ALL, topk=0):
    """Stats of float64 materialized logits, and autograd of sum(g . stats) w.r.t. x, w, b."""
    x = head.x.double().requires_grad_(needs.dx)
    w = head.w.double().requires_grad_(needs.dw)
    b = None if head.b is None else head.b.double().requires_grad_(needs.db)
    z = x @ w.T + (b if b is not None else 0)
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    lse = z.logsumexp(1)
    s = (torch.softmax(z, 1) * z).sum(1)
    valid = head.y >= 0
    zy = torch.where(valid, z.gather(1, head.y.clamp(min=0)[:, None])[:, 0], 0.0)
    zc = (z * (head.c.double() if head.c is not None else 1.0)).sum(1)
    stats = dict(lse=lse, zy=zy, S=s, Z=zc, argmax=z.argmax(1), z=z,
                 topk=z.topk(topk, 1).values if topk else None)
    if grads is None:
        return stats
    loss = sum((g.double() * t).sum() for g, t in zip(grads, (lse, zy, s, zc)) if g is not None)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, inputs))
    return tuple(next(got) if t is not None and t.requires_grad else None for t in (x, w, b))


def check_forward(head, topk=0, backend=None):
    st = (backend or FusedTritonBackend()).forward(head, topk=topk)
    ref = reference(head, topk=topk)
    tol = torch.float32  # statistics of the given (rounded) inputs, accumulated in float32
    for name, got in (("lse", st.lse), ("zy", st.target_logit), ("S", st.expected_logit),
                      ("Z", st.weighted_logit_sum)):
        assert got.dtype == torch.float32
        assert_close(got, ref[name], tol, name)
    # argmax: the logit there is the max (exact ties are tested below)
    assert st.argmax.dtype == torch.int64
    z = ref["z"]
    assert_close(z.gather(1, st.argmax[:, None])[:, 0], z.max(1).values, tol, "argmax")
    if topk:
        assert_close(st.topk, ref["topk"], tol, "topk")
    else:
        assert st.topk is None
    return st


def check_backward(head, grads, needs=ALL, filter_eps=None):
    be = FusedTritonBackend()
    st = be.forward(head)
    got = be.backward(head, st, grads, needs, filter_eps)
    ref = reference(head, grads, needs)
    for name, g, r, t in zip(("dx", "dw", "db"), got, ref, (head.x, head.w, head.b)):
        if r is None:
            assert g is None, name
        else:
            assert g.dtype == t.dtype, name
            assert_close(g, r, head.x.dtype, name)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(),
    dict(n=1, bias=False),
    dict(class_weights=True, softcap=3.0),
    dict(n=20, d=16, v=300, ignore=False),
])
def test_forward(dtype, case):
    check_forward(make(dtype, **case), topk=5 if case.get("n") != 1 else 1)


def test_forward_vocab_splits_merge():
    """Several programs per row block, partial statistics merged on the host."""
    head = make(torch.float32, class_weights=True)
    for splits in (2, 3, 9):
        check_forward(head, topk=8, backend=FusedTritonBackend(vocab_splits=splits))


@pytest.mark.parametrize("splits", [1, 3])
def test_argmax_ties_take_first_index(splits):
    head = make(torch.float32, n=19, v=257, bias=False, ignore=False)
    w = head.w.clone()
    w[[40, 41, 200]] = 1.0  # with x >= 0, an exact tie for the max, across tiles and splits
    head = Head(head.x.abs(), w, None, head.y, None, None)
    st = FusedTritonBackend(vocab_splits=splits).forward(head, topk=3)
    assert torch.equal(st.argmax, torch.full_like(st.argmax, 40))
    assert torch.equal(st.topk[:, 0], st.topk[:, 2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(),
    dict(class_weights=True),
    dict(softcap=3.0, class_weights=True),
    dict(n=1, d=48, v=131, bias=False, ignore=False),
])
def test_backward(dtype, case):
    head = make(dtype, **case)
    check_backward(head, upstream(head.x.shape[0]))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("needs", [Needs(True, False, False), Needs(False, True, False),
                                   Needs(False, False, True)], ids=["dx", "dw", "db"])
@pytest.mark.parametrize("which", [("lse",), ("zy", "Z"), ("S",)], ids="+".join)
def test_backward_subsets(needs, which, softcap):
    head = make(torch.float32, n=20, v=100, class_weights=True, softcap=softcap)
    check_backward(head, upstream(20, which), needs)


def test_backward_no_bias_needs_db():
    head = make(torch.float32, n=8, v=50, bias=False)
    assert check_backward(head, upstream(8), ALL)[2] is None


def test_filter_eps_bf16_within_tolerance():
    # the mass sits on the first 40 tokens: the other tiles hold only p < 2^-12 and are skipped
    head = make(torch.bfloat16, n=48, v=300, seed=3)
    b = head.b.float()
    b[:40] += 12.0
    head = Head(head.x, head.w, b.to(torch.bfloat16), head.y, None, None)
    grads = upstream(48, ("lse", "zy", "S"))
    be = FusedTritonBackend()
    st = be.forward(head)
    exact = be.backward(head, st, grads, ALL)
    filtered = check_backward(head, grads, ALL, filter_eps=2.0 ** -12)
    assert not all(torch.equal(a, b) for a, b in zip(exact, filtered)), "filter skipped nothing"
    for name, a, b in zip(("dx", "dw", "db"), filtered, exact):
        assert_close(a, b, torch.bfloat16, name)


@pytest.mark.skipif(not INTERPRETED, reason="the up-cast is the interpreter's (compiled tl.dot takes bf16)")
def test_bf16_dot_upcast_under_interpreter():
    x = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert tile_args(x, INTERPRETER)["UPCAST"] is True
    assert tile_args(x.half(), INTERPRETER)["UPCAST"] is False


def test_empty_rows():
    head = make(torch.float32, n=0)
    st = FusedTritonBackend().forward(head, topk=2)
    assert st.lse.shape == (0,) and st.topk.shape == (0, 2)
    dx, dw, db = FusedTritonBackend().backward(head, st, upstream(0), ALL)
    assert dx.shape == (0, 40) and not dw.any() and not db.any()


def test_input_errors():
    be = FusedTritonBackend()
    assert be.available(KERNEL_DEVICE)
    head = make(torch.float32, n=4, d=16, v=40)
    with pytest.raises(TypeError, match="float64"):
        be.forward(make(torch.float64, n=4, d=16, v=40))
    with pytest.raises(ValueError, match="contiguous"):
        be.forward(Head(head.x.T.contiguous().T, head.w, head.b, head.y, None, None))
    with pytest.raises(ValueError, match="topk"):
        be.forward(head, topk=MAX_TOPK + 1)
