"""The public API's behaviour over every backend (the ``backend`` fixture): ``shift``,
``return_stats``, the module, all-ignored batches, zero token weights, the forms of
``entropy_weights`` and ``normalizer``, autocast, non-contiguous inputs, ``no_grad``, the
single pass against the recompute path, ``grad_output`` scaling, ``backend="auto"``.

Backend results use float32 inputs (what the triton backend takes) and are held to the
float64 oracle on the same values with ``TOLERANCE[float32]``; shapes stay tiny for the
Triton interpreter (N <= 16, D <= 24, V <= 67)."""
import pytest
import torch
from torch import Tensor

import sftkey
from sftkey import config
from sftkey.core.driver import resolve_backend, triton_usable
from sftkey.backends.torch import TorchBackend

from conftest import DEVICE, TOLERANCE, assert_close

F32, F64 = torch.float32, torch.float64
D, V = 16, 37
LEAD = (2, 7)
NAMES = ("hidden", "weight", "bias")


def _head(seed, lead=LEAD, d=D, v=V, bias=True, dtype=F32, ignore_frac=0.2):
    """``hidden [*lead, d]``, ``weight [v, d]``, ``bias [v]`` (leaves requiring grad), ``targets``
    with about ``ignore_frac`` ignored (at least one ignored, at least one not) and a generator
    for the test's further random inputs."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g)
    w = torch.randn(v, d, generator=g) * (1.5 / d ** 0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    y = torch.randint(0, v, lead, generator=g)
    mask = torch.rand(lead, generator=g) < ignore_frac
    mask.view(-1)[0], mask.view(-1)[-1] = True, False
    y[mask] = -100
    h, w = (t.to(DEVICE, dtype).requires_grad_() for t in (h, w))
    b = None if b is None else b.to(DEVICE, dtype).requires_grad_()
    return h, w, b, y.to(DEVICE), g


def _rand(g, shape, scale=1.0, offset=0.0, dtype=F32):
    return (torch.rand(shape, generator=g) * scale + offset).to(DEVICE, dtype)


def _leaves(*ts):
    return [t for t in ts if t is not None and t.requires_grad]


def _grads(loss, leaves, upstream=None):
    """``loss`` (detached) and the gradients of ``leaves`` (zeros where unused); a non-scalar loss
    is contracted with ``upstream``."""
    scalar = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    gs = torch.autograd.grad(scalar, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves)]


def _f64(v):
    return v.detach().double() if isinstance(v, Tensor) and v.is_floating_point() else v


def _reference(h, w, b, y, upstream=None, cast=None, **kw):
    """The oracle in float64 on the same values (first cast to ``cast``, e.g. bfloat16, if given):
    ``(loss, grads of hidden/weight/bias)``."""
    def leaf(t):
        if t is None:
            return None
        t = t.detach()
        if cast is not None:
            t = t.to(cast)
        return t.double().requires_grad_()

    hh, ww, bb = leaf(h), leaf(w), leaf(b)
    loss = sftkey.reference.linear_cross_entropy(hh, ww, y, bias=bb, **{k: _f64(v) for k, v in kw.items()})
    return _grads(loss, _leaves(hh, ww, bb), upstream)


def _check(got, want, dtype=F32, what=""):
    (gl, gg), (wl, wg) = got, want
    assert_close(gl, wl, dtype, f"{what} loss")
    assert len(gg) == len(wg)
    for name, a, b in zip(NAMES, gg, wg):
        assert_close(a, b, dtype, f"{what} grad of {name}")


class _Spy:
    """Counts calls of the backend class's ``single_pass`` and ``backward`` (the two paths), and
    records the rows and the needed gradients each single pass was given."""

    def __init__(self, monkeypatch, backend):
        self.calls = {"single_pass": 0, "backward": 0}
        self.rows, self.needs = [], []
        cls = type(resolve_backend(backend, DEVICE, torch.float32))
        for name in self.calls:
            original = getattr(cls, name)

            def wrapper(*args, _original=original, _name=name, **kwargs):
                self.calls[_name] += 1
                if _name == "single_pass":
                    self.rows.append(args[1].y.shape[0])  # the tokens it computes
                    self.needs.append(tuple(args[3]))
                return _original(*args, **kwargs)

            monkeypatch.setattr(cls, name, wrapper)


# --------------------------------------------------------------------------- shift


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ew_form", ["per_token", "scalar"])
def test_shift_equals_manual_shift(backend, reduction, ew_form):
    seed = 10 + ["mean", "sum", "none"].index(reduction) + 3 * (ew_form == "scalar")
    h, w, b, y, g = _head(seed, lead=(2, 8))
    y[:, 0] = 5  # position 0's label is never predicted under shift: it must be dropped
    a = _rand(g, y.shape, 2.0)
    e = _rand(g, y.shape, 0.5) if ew_form == "per_token" else 0.2
    upstream = torch.randn(y.shape, generator=g)
    common = dict(bias=b, reduction=reduction, backend=backend, label_smoothing=0.1, z_loss=1e-3)

    got = sftkey.linear_cross_entropy(h, w, y, token_weights=a, entropy_weights=e, shift=True, **common)
    gl, (gh, gw, gb) = _grads(got, [h, w, b], upstream if reduction == "none" else None)

    e_manual = e[:, 1:] if isinstance(e, Tensor) else e
    manual = sftkey.linear_cross_entropy(h[:, :-1], w, y[:, 1:], token_weights=a[:, 1:], entropy_weights=e_manual,
                                         **common)
    up = upstream[:, :-1] if reduction == "none" else None
    ml, (mh, mw, mb) = _grads(manual, [h, w, b], up)

    if reduction == "none":
        assert gl.shape == y.shape
        assert torch.all(gl[:, -1] == 0), "the last position has no target"
        assert_close(gl[:, :-1], ml, F32, "shifted per-token loss")
    else:
        assert gl.shape == ()
        assert_close(gl, ml, F32, "shifted loss")
    assert torch.all(gh[:, -1] == 0), "the last position gets no gradient"
    for name, x, m in [("hidden", gh, mh), ("weight", gw, mw), ("bias", gb, mb)]:
        assert_close(x, m, F32, f"grad of {name}")
    # and both against the oracle on the manual shift
    want = _reference(h[:, :-1], w, b, y[:, 1:], up, token_weights=a[:, 1:], entropy_weights=e_manual,
                      **{k: v for k, v in common.items() if k not in ("bias", "backend")})
    assert_close(ml, want[0], F32, "manual shift vs reference")
    for name, x, r in zip(NAMES, (gh[:, :-1], gw, gb), want[1]):
        assert_close(x, r, F32, f"shift=True vs reference: grad of {name}")


def test_shift_1d_targets(backend):
    """A single sequence ``[T, D]`` / ``[T]`` shifts along its only dimension."""
    h, w, b, y, g = _head(20, lead=(12,))
    y[0] = 3
    got = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, shift=True, backend=backend), [h, w, b])
    want = _reference(h[:-1], w, b, y[1:])
    assert_close(got[0], want[0], F32, "loss")
    assert torch.all(got[1][0][-1] == 0)
    assert_close(got[1][0][:-1], want[1][0], F32, "grad of hidden")
    assert_close(got[1][1], want[1][1], F32, "grad of weight")


# --------------------------------------------------------------------------- return_stats


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shift", [False, True])
def test_return_stats(backend, reduction, shift):
    h, w, b, y, g = _head(30 + 2 * shift + (reduction == "none"))
    with torch.no_grad():
        z = h.double() @ w.double().T + b.double()
    y[0, 1:5] = z[0, :4].argmax(-1) if shift else z[0, 1:5].argmax(-1)  # some predictions correct
    kw = dict(bias=b, label_smoothing=0.1, shift=shift, reduction=reduction)
    loss, st = sftkey.linear_cross_entropy(h, w, y, return_stats=True, backend=backend, **kw)
    plain = sftkey.linear_cross_entropy(h, w, y, backend=backend, **kw)
    assert_close(loss.detach(), plain.detach(), F32, "loss with return_stats")
    assert isinstance(st, sftkey.LossStats)
    ref_loss, ref = sftkey.reference.linear_cross_entropy(
        *(t.detach().double() for t in (h, w)), y, return_stats=True, **{**kw, "bias": b.detach().double()})
    assert_close(loss.detach(), ref_loss, F32, "loss vs reference")
    for name in ("lse", "entropy", "target_logprob"):
        got = getattr(st, name)
        assert got.shape == y.shape, name
        assert not got.requires_grad, name
        assert_close(got, getattr(ref, name), F32, name)
    assert st.correct.dtype == torch.bool and st.correct.shape == y.shape
    assert torch.equal(st.correct, ref.correct)
    assert int(st.correct.sum()) >= 3, "the test needs correct predictions"
    ignored = y == -100
    if shift:
        ignored = torch.cat([y[:, 1:] == -100, torch.ones_like(y[:, :1], dtype=torch.bool)], 1)
    assert torch.all(st.target_logprob[ignored] == 0) and not st.correct[ignored].any()
    if shift:
        assert torch.all(st.target_logprob[:, -1] == 0)


# --------------------------------------------------------------------------- module


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_functional(backend, reduction):
    seed = 40 + ["mean", "sum", "none"].index(reduction)
    h, w, b, y, g = _head(seed)
    cw = _rand(g, V, 1.0, 0.2)
    a = _rand(g, y.shape, 2.0)
    e = _rand(g, y.shape, 0.3)
    opts = dict(class_weights=cw, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, dft=True, reduction=reduction,
                backend=backend)
    module = sftkey.LinearCrossEntropyLoss(entropy_weights=0.05, **opts)
    upstream = torch.randn(y.shape, generator=g) if reduction == "none" else None

    got = _grads(module(h, w, y, bias=b, token_weights=a), [h, w, b], upstream)
    want = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, token_weights=a, entropy_weights=0.05, **opts),
                  [h, w, b], upstream)
    _check(got, want, what="module (init entropy_weights)")
    _check(got, _reference(h, w, b, y, upstream, token_weights=a, entropy_weights=0.05,
                           **{k: v for k, v in opts.items() if k != "backend"}), what="module vs reference")

    # a per-call entropy_weights overrides the constructor's; normalizer goes to forward
    got = _grads(module(h, w, y, bias=b, token_weights=a, entropy_weights=e, normalizer=5), [h, w, b], upstream)
    want = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, token_weights=a, entropy_weights=e, normalizer=5,
                                              **opts), [h, w, b], upstream)
    _check(got, want, what="module (per-call entropy_weights)")


def test_module_return_stats_and_shift(backend):
    h, w, b, y, g = _head(43)
    module = sftkey.LinearCrossEntropyLoss(shift=True, return_stats=True, backend=backend)
    loss, st = module(h, w, y, bias=b)
    want, ref = sftkey.linear_cross_entropy(h, w, y, bias=b, shift=True, return_stats=True, backend=backend)
    assert_close(loss.detach(), want.detach(), F32, "loss")
    assert_close(st.lse, ref.lse, F32, "lse")
    assert torch.equal(st.correct, ref.correct)


def test_module_class_weights_is_a_buffer():
    h, w, b, y, g = _head(44)
    cw = _rand(g, V, 1.0, 0.2)
    module = sftkey.LinearCrossEntropyLoss(class_weights=cw, label_smoothing=0.1, backend="torch")
    assert "class_weights" in dict(module.named_buffers())
    assert "class_weights" in module.state_dict()
    assert list(module.parameters()) == []
    assert sftkey.LinearCrossEntropyLoss().class_weights is None
    assert "class_weights" not in sftkey.LinearCrossEntropyLoss().state_dict()

    # state_dict round trip
    other = sftkey.LinearCrossEntropyLoss(class_weights=torch.ones(V), label_smoothing=0.1, backend="torch")
    assert not torch.allclose(other(h, w, y, bias=b), module(h, w, y, bias=b))
    other.load_state_dict(module.state_dict())
    assert_close(other(h, w, y, bias=b).detach(), module(h, w, y, bias=b).detach(), F32, "after load_state_dict")

    # .to(dtype) moves the buffer and the module still matches the functional in float64
    module64 = module.to(torch.float64)
    assert module64.class_weights.dtype == torch.float64
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    got = _grads(module64(h64, w64, y, bias=b64), [h64, w64, b64])
    want = _grads(sftkey.linear_cross_entropy(h64, w64, y, bias=b64, class_weights=cw.double(), label_smoothing=0.1),
                  [h64, w64, b64])
    _check(got, want, F64, "float64 module")

    # .to(device): the buffer follows (meta stands in for a second device)
    try:
        moved = sftkey.LinearCrossEntropyLoss(class_weights=cw).to("meta")
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no usable meta device: {exc}")
    assert moved.class_weights.device.type == "meta"


# --------------------------------------------------------------------------- ignored tokens, zero weights


ALL_IGNORED_OPTS = {
    "plain": {},
    "everything": dict(label_smoothing=0.2, class_weights=True, z_loss=1e-2, entropy_weights=0.3,
                       token_weights=True, dft=True, softcap=5.0),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", sorted(ALL_IGNORED_OPTS))
def test_all_ignored_gives_zero_loss_and_zero_grads(backend, reduction, opts):
    h, w, b, y, g = _head(50 + ["mean", "sum", "none"].index(reduction) + 3 * (opts == "plain"))
    y = torch.full_like(y, -100)
    kw = dict(ALL_IGNORED_OPTS[opts])
    if kw.pop("class_weights", False):
        kw["class_weights"] = _rand(g, V, 1.0, 0.2)
    if kw.pop("token_weights", False):
        kw["token_weights"] = _rand(g, y.shape, 2.0)
    loss = sftkey.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend, **kw)
    assert loss.shape == (y.shape if reduction == "none" else ())
    assert torch.all(loss == 0), f"all-ignored loss must be 0, got {loss}"
    loss.sum().backward()
    for name, t in zip(NAMES, (h, w, b)):
        assert t.grad is not None, name
        assert torch.isfinite(t.grad).all() and torch.all(t.grad == 0), f"grad of {name} must be 0, not NaN"
    with torch.no_grad():
        assert torch.all(sftkey.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend, **kw) == 0)


def test_shift_of_length_one_sequences_ignores_everything(backend):
    h, w, b, y, g = _head(53, lead=(3, 1), ignore_frac=0.0)
    loss = sftkey.linear_cross_entropy(h, w, y, bias=b, shift=True, backend=backend)
    loss.backward()
    assert loss.item() == 0
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0) and torch.all(b.grad == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_token_weights_give_zero_grads(backend, reduction):
    h, w, b, y, g = _head(60 + ["mean", "sum", "none"].index(reduction), ignore_frac=0.1)
    a = _rand(g, y.shape, 1.0, 0.5)
    zero = torch.zeros_like(y, dtype=torch.bool)
    zero.view(-1)[1::3] = True
    zero &= y != -100
    assert zero.sum() >= 3
    a[zero] = 0
    kw = dict(bias=b, token_weights=a, reduction=reduction, backend=backend, label_smoothing=0.1)
    upstream = torch.randn(y.shape, generator=g) if reduction == "none" else None
    loss, (gh, gw, gb) = _grads(sftkey.linear_cross_entropy(h, w, y, **kw), [h, w, b], upstream)
    assert torch.all(gh[zero] == 0), "tokens of weight 0 must get no gradient"
    assert gh[~zero & (y != -100)].abs().amax(-1).min() > 0
    if reduction == "none":
        assert torch.all(loss[zero] == 0)
    # same as dropping those tokens altogether (the weighted mean's denominator has no a_i = 0 term)
    keep = ~zero
    sub = dict(kw, token_weights=a[keep][None])
    up = None if upstream is None else upstream[keep][None]
    sl, (sh, sw, sb) = _grads(sftkey.linear_cross_entropy(h[keep][None], w, y[keep][None], **sub), [h, w, b], up)
    if reduction == "none":
        assert_close(loss[keep], sl[0], F32, "kept tokens' losses")
    else:
        assert_close(loss, sl, F32, "loss without the zero-weight tokens")
    assert_close(gw, sw, F32, "grad of weight")
    assert_close(gb, sb, F32, "grad of bias")
    assert_close(gh[keep], sh[keep], F32, "grad of hidden on kept tokens")


# --------------------------------------------------------------------------- entropy_weights forms


ENTROPY_FORMS = {
    "python_float": lambda shape: 0.3,
    "0d_tensor": lambda shape: torch.tensor(0.3),
    "0d_float64_tensor": lambda shape: torch.tensor(0.3, dtype=F64),
    "per_token_tensor": lambda shape: torch.full(shape, 0.3),
}
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", sorted(ENTROPY_FORMS))
def test_entropy_weights_forms(backend, form, reduction):
    """A Python scalar, a 0-d tensor and a per-token tensor of the same value are the same loss.
    (A 0-d tensor used to fail in the single pass: ``LossOptions.rows`` sliced it.)"""
    h, w, b, y, g = _head(70 + ["mean", "sum", "none"].index(reduction))
    upstream = torch.randn(y.shape, generator=g) if reduction == "none" else None
    e = ENTROPY_FORMS[form](y.shape)
    got = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend,
                                             entropy_weights=e), [h, w, b], upstream)
    want = _reference(h, w, b, y, upstream, entropy_weights=0.3, reduction=reduction)
    _check(got, want, what=f"entropy_weights as {form}:")
    without = _reference(h, w, b, y, upstream, reduction=reduction)
    assert abs(without[0].sum().item() - want[0].sum().item()) > 1e-2, "the entropy term must move the loss"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_entropy_weights_per_token(backend, reduction):
    h, w, b, y, g = _head(73 + (reduction == "none"))
    upstream = torch.randn(y.shape, generator=g) if reduction == "none" else None
    e = _rand(g, y.shape, 1.0, -0.3)
    got = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend,
                                             entropy_weights=e), [h, w, b], upstream)
    _check(got, _reference(h, w, b, y, upstream, entropy_weights=e, reduction=reduction),
           what="random per-token entropy_weights:")


def test_entropy_weights_0d_tensor_without_grad(backend):
    """The 0-d form outside the single pass (no grad needed: the plain forward)."""
    h, w, b, y, g = _head(75)
    with torch.no_grad():
        got = sftkey.linear_cross_entropy(h, w, y, bias=b, backend=backend, entropy_weights=torch.tensor(0.3))
    assert_close(got, _reference(h, w, b, y, entropy_weights=0.3)[0], F32, "loss")


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("bias", [False, True])
def test_autocast_bf16(backend, bias):
    h, w, b, y, g = _head(80 + bias, bias=bias)
    assert h.dtype == w.dtype == F32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sftkey.linear_cross_entropy(h, w, y, bias=b, backend=backend, label_smoothing=0.1)
    assert loss.dtype == F32
    got = _grads(loss, _leaves(h, w, b))
    for name, t in zip(NAMES, got[1]):
        assert t.dtype == F32, f"grad of {name} must come back float32, got {t.dtype}"
    want = _reference(h, w, b, y, cast=torch.bfloat16, label_smoothing=0.1)
    _check(got, want, torch.bfloat16, "autocast vs reference on bf16-cast inputs:")
    # and it really computed in bf16: farther from the float32 result than float32's tolerance
    exact = _reference(h, w, b, y, label_smoothing=0.1)
    assert max((a - e).norm() / e.norm() for a, e in zip(got[1], exact[1])) > TOLERANCE[F32]


def test_autocast_mixed_dtypes_are_accepted(backend):
    """Under autocast, float32 master weights with bf16 activations is the usual case."""
    h, w, b, y, g = _head(82)
    hb = h.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sftkey.linear_cross_entropy(hb, w, y, bias=b, backend=backend)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and w.grad.dtype == F32 and b.grad.dtype == F32
    want = _reference(hb, w, b, y, cast=torch.bfloat16)
    _check((loss.detach(), [hb.grad, w.grad, b.grad]), want, torch.bfloat16, "mixed autocast:")


# --------------------------------------------------------------------------- layouts, grad modes


def test_noncontiguous_inputs(backend):
    g = torch.Generator().manual_seed(90)
    h_base = torch.randn(LEAD[1], LEAD[0], D, generator=g).to(DEVICE).requires_grad_()
    w_base = (torch.randn(D, V, generator=g) / D ** 0.5).to(DEVICE).requires_grad_()
    b_base = torch.randn(2 * V, generator=g).to(DEVICE).requires_grad_()
    h, w, b = h_base.transpose(0, 1), w_base.t(), b_base[::2]
    assert not (h.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    y = torch.randint(0, V, LEAD, generator=g).to(DEVICE)
    y[0, 0] = -100
    a = _rand(g, (LEAD[1], LEAD[0]), 1.0, 0.5).t()  # a non-contiguous token_weights too
    got = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, token_weights=a, backend=backend),
                 [h_base, w_base, b_base])
    hh, ww, bb = (t.detach().clone().double().requires_grad_() for t in (h, w, b))
    want = _grads(sftkey.reference.linear_cross_entropy(hh, ww, y, bias=bb, token_weights=a.double()), [hh, ww, bb])
    assert_close(got[0], want[0], F32, "loss")
    assert_close(got[1][0], want[1][0].transpose(0, 1), F32, "grad of hidden's base")
    assert_close(got[1][1], want[1][1].t(), F32, "grad of weight's base")
    assert_close(got[1][2][::2], want[1][2], F32, "grad of bias's base")
    assert torch.all(got[1][2][1::2] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_grad_forward_equals_grad_mode(backend, reduction):
    h, w, b, y, g = _head(100 + ["mean", "sum", "none"].index(reduction))
    kw = dict(bias=b, reduction=reduction, backend=backend, token_weights=_rand(g, y.shape, 1.0, 0.5),
              entropy_weights=0.1, z_loss=1e-3)
    with_grad = sftkey.linear_cross_entropy(h, w, y, **kw)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = sftkey.linear_cross_entropy(h, w, y, **kw)
    assert not without.requires_grad
    assert_close(without, with_grad.detach(), F32, "no_grad vs grad mode")
    with torch.inference_mode():
        inference = sftkey.linear_cross_entropy(h, w, y, **kw)
    assert_close(inference, with_grad.detach(), F32, "inference_mode vs grad mode")
    upstream = torch.ones(y.shape) if reduction == "none" else None
    want = _reference(h, w, b, y, upstream, **{k: v for k, v in kw.items() if k not in ("bias", "backend")})
    assert_close(without, want[0], F32, "no_grad vs reference")


def test_frozen_head(backend):
    """Only hidden requires grad (frozen LM head, e.g. LoRA): weight and bias get no gradient."""
    h, w, b, y, g = _head(105)
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss = sftkey.linear_cross_entropy(h, w, y, bias=b, backend=backend, z_loss=1e-3)
    loss.backward()
    assert w.grad is None and b.grad is None
    assert_close(h.grad, _reference(h, w, b, y, z_loss=1e-3)[1][0], F32, "grad of hidden")


# --------------------------------------------------------------------------- single pass vs recompute


PATH_OPTS = {
    "plain": {},
    "weights": dict(token_weights=True, class_weights=True, label_smoothing=0.1),
    "everything": dict(token_weights=True, class_weights=True, label_smoothing=0.05, dft=True, z_loss=1e-2,
                       entropy_weights="per_token", softcap=3.0),
    "normalizer": dict(token_weights=True, normalizer=9),
}


def _path_options(name, y, g):
    kw = dict(PATH_OPTS[name])
    if kw.pop("token_weights", False):
        kw["token_weights"] = _rand(g, y.shape, 2.0)
    if kw.pop("class_weights", False):
        kw["class_weights"] = _rand(g, V, 1.0, 0.2)
    if kw.get("entropy_weights") == "per_token":
        kw["entropy_weights"] = _rand(g, y.shape, 0.5)
    return kw


def _denominator(y, kw):
    if kw.get("normalizer") is not None:
        return float(kw["normalizer"])
    valid = y != -100
    a = kw.get("token_weights", torch.ones(y.shape))
    cw = kw.get("class_weights", torch.ones(V))
    return float((a * cw[y.clamp_min(0)] * valid).sum())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opts", sorted(PATH_OPTS))
def test_single_pass_and_recompute_agree(backend, reduction, opts, monkeypatch):
    h, w, b, y, g = _head(110 + 2 * sorted(PATH_OPTS).index(opts) + (reduction == "sum"))
    kw = _path_options(opts, y, g)
    spy = _Spy(monkeypatch, backend)

    single = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend, **kw),
                    [h, w, b])
    assert spy.calls["single_pass"] == 1, "a scalar loss with grad takes the single pass"
    # (a backend without its own single pass runs the generic one, which calls its backward once)
    backward_calls = spy.calls["backward"]

    none_kw = {k: v for k, v in kw.items() if k != "normalizer"}
    per_token = sftkey.linear_cross_entropy(h, w, y, bias=b, reduction="none", backend=backend, **none_kw)
    by_hand = per_token.sum() if reduction == "sum" else per_token.sum() / _denominator(y, kw)
    recompute = _grads(by_hand, [h, w, b])
    assert spy.calls == {"single_pass": 1, "backward": backward_calls + 1}, "reduction='none' takes the recompute path"

    _check(single, recompute, what="single pass vs recompute:")
    _check(single, _reference(h, w, b, y, reduction=reduction, **kw), what="single pass vs reference:")


SKIP_CASES = {
    "ignored only": {},
    "zero token weights": dict(token_weights=True),
    "zero token weights, entropy": dict(token_weights=True, entropy_weights=True),
    "zero token weights, z-loss": dict(token_weights=True, z_loss=1e-2),
    "zero class weights": dict(class_weights=True),
    "zero class weights, smoothing": dict(class_weights=True, label_smoothing=0.1),
}


def _skip_options(name, y, g):
    """Options of ``SKIP_CASES[name]``, each weight zero on about a third of the tokens (classes)."""
    kw = dict(SKIP_CASES[name])
    if kw.pop("token_weights", False):
        kw["token_weights"] = _rand(g, y.shape, 2.0) * (torch.rand(y.shape, generator=g) > 0.3).to(DEVICE)
    if kw.pop("entropy_weights", False):
        kw["entropy_weights"] = _rand(g, y.shape, 0.5) * (torch.rand(y.shape, generator=g) > 0.5).to(DEVICE)
    if kw.pop("class_weights", False):
        kw["class_weights"] = _rand(g, V, 1.0, 0.2) * (torch.rand(V, generator=g) > 0.3).to(DEVICE)
    return kw


@pytest.mark.parametrize("case", sorted(SKIP_CASES))
def test_single_pass_skips_tokens_without_loss(backend, case, monkeypatch):
    """The single pass gives the backend exactly the tokens the reference gives a loss or a
    gradient (ignored, zero-weight tokens cost nothing); under ``no_grad`` the same tokens and
    no gradients; with ``return_stats`` every token's statistics; results equal the reference."""
    h, w, b, y, g = _head(150 + sorted(SKIP_CASES).index(case), lead=(3, 9))
    kw = _skip_options(case, y, g)
    hh = h.detach().double().requires_grad_()
    per_token = sftkey.reference.linear_cross_entropy(hh, w.detach().double(), y, bias=b.detach().double(),
                                                      reduction="none", **{k: _f64(v) for k, v in kw.items()})
    live = (per_token != 0) | (torch.autograd.grad(per_token.sum(), hh)[0] != 0).any(-1)
    assert 0 < int(live.sum()) < y.numel(), "the case must have tokens with and without loss"
    spy = _Spy(monkeypatch, backend)
    got = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, backend=backend, **kw), [h, w, b])
    _check(got, _reference(h, w, b, y, **kw), what=f"{case}:")
    assert spy.rows == [int(live.sum())] and spy.needs == [(True, True, True)]
    with torch.no_grad():
        loss = sftkey.linear_cross_entropy(h, w, y, bias=b, backend=backend, **kw)
    assert_close(loss, got[0], F32, "no_grad loss")
    assert spy.rows[1:] == [int(live.sum())] and spy.needs[1:] == [(False, False, False)]
    _, stats = sftkey.linear_cross_entropy(h, w, y, bias=b, backend=backend, return_stats=True, **kw)
    assert spy.rows[2:] == [int(live.sum())]
    _, want = sftkey.reference.linear_cross_entropy(hh, w.detach().double(), y, bias=b.detach().double(),
                                                    return_stats=True, **{k: _f64(v) for k, v in kw.items()})
    for name in ("lse", "entropy", "target_logprob"):
        assert_close(getattr(stats, name), getattr(want, name), F32, f"stats.{name} of every token")
    assert torch.equal(stats.correct, want.correct)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_blocks_of_rows(reduction, monkeypatch):
    """The chunked torch backend across several row blocks (16 rows each): the single pass slices
    the per-token options by block, the recompute path does not."""
    monkeypatch.setattr(config, "chunk_budget_bytes", 1024)
    h, w, b, y, g = _head(120 + ["mean", "sum", "none"].index(reduction), lead=(3, 15))
    kw = _path_options("everything", y, g)
    upstream = torch.randn(y.shape, generator=g) if reduction == "none" else None
    spy = _Spy(monkeypatch, "torch")
    got = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend="torch", **kw),
                 [h, w, b], upstream)
    assert spy.calls["single_pass" if reduction != "none" else "backward"] == 1
    _check(got, _reference(h, w, b, y, upstream, reduction=reduction, **kw), what=f"3 row blocks, {reduction}:")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weights_requiring_grad_take_the_recompute_path(backend, reduction, monkeypatch):
    """token_weights that require grad cannot be folded into a single pass: their gradient must
    still be right."""
    h, w, b, y, g = _head(130 + (reduction == "sum"))
    a = _rand(g, y.shape, 2.0).requires_grad_()
    spy = _Spy(monkeypatch, backend)
    loss = sftkey.linear_cross_entropy(h, w, y, bias=b, token_weights=a, reduction=reduction, backend=backend)
    got = torch.autograd.grad(loss, [a, h, w, b])
    assert spy.calls["backward"] == 1
    a64 = a.detach().double().requires_grad_()
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref = sftkey.reference.linear_cross_entropy(*leaves[:2], y, bias=leaves[2], token_weights=a64, reduction=reduction)
    want = torch.autograd.grad(ref, [a64, *leaves])
    for name, x, r in zip(["token_weights", *NAMES], got, want):
        assert_close(x, r, F32, f"grad of {name}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scaled_loss_scales_gradients(backend, reduction):
    """The single pass stores its gradients for grad_output = 1; the backward must scale them."""
    h, w, b, y, g = _head(140 + (reduction == "sum"))
    kw = dict(bias=b, reduction=reduction, backend=backend, label_smoothing=0.1, z_loss=1e-3)
    base = _grads(sftkey.linear_cross_entropy(h, w, y, **kw), [h, w, b])
    doubled = _grads(2 * sftkey.linear_cross_entropy(h, w, y, **kw), [h, w, b])
    for name, x, r in zip(NAMES, doubled[1], base[1]):
        assert_close(x, 2 * r, F32, f"(2 * loss): grad of {name}")
    loss = sftkey.linear_cross_entropy(h, w, y, **kw)
    neg = torch.autograd.grad(loss, [h, w, b], grad_outputs=torch.tensor(-0.5), retain_graph=True)
    for name, x, r in zip(NAMES, neg, base[1]):
        assert_close(x, -0.5 * r, F32, f"grad_output -0.5: grad of {name}")
    twice = torch.autograd.grad(loss + 3 * loss, [h, w, b])
    for name, x, r in zip(NAMES, twice, base[1]):
        assert_close(x, 4 * r, F32, f"(loss + 3 * loss): grad of {name}")


def test_int32_targets(backend):
    h, w, b, y, g = _head(145)
    kw = dict(bias=b, backend=backend, shift=True, label_smoothing=0.1)
    got = _grads(sftkey.linear_cross_entropy(h, w, y.int(), **kw), [h, w, b])
    _check(got, _grads(sftkey.linear_cross_entropy(h, w, y, **kw), [h, w, b]), what="int32 vs int64 targets:")
    _check(got, _reference(h, w, b, y, shift=True, label_smoothing=0.1), what="int32 targets vs reference:")


def test_bf16_inputs_give_float32_loss_and_bf16_grads(backend):
    h, w, b, y, g = _head(146, dtype=torch.bfloat16)
    loss = sftkey.linear_cross_entropy(h, w, y, bias=b, backend=backend, z_loss=1e-3)
    assert loss.dtype == F32
    got = _grads(loss, [h, w, b])
    assert all(t.dtype == torch.bfloat16 for t in got[1])
    _check(got, _reference(h, w, b, y, z_loss=1e-3), torch.bfloat16, "bf16 inputs:")


# --------------------------------------------------------------------------- normalizer, auto


def test_normalizer_forms(backend):
    h, w, b, y, g = _head(150)
    a = _rand(g, y.shape, 2.0)
    kw = dict(bias=b, token_weights=a, backend=backend, entropy_weights=0.1)
    total = _grads(sftkey.linear_cross_entropy(h, w, y, reduction="sum", **kw), [h, w, b])
    for form, n in [("int", 7), ("float", 7.0), ("0-d tensor", torch.tensor(7.0)), ("0-d int tensor", torch.tensor(7)),
                    ("0-d float64 tensor", torch.tensor(7.0, dtype=F64))]:
        loss = sftkey.linear_cross_entropy(h, w, y, normalizer=n, **kw)
        assert loss.shape == () and loss.dtype == F32, form
        got = _grads(loss, [h, w, b])
        _check(got, (total[0] / 7, [t / 7 for t in total[1]]), what=f"normalizer as {form}:")
    # the normalizer replaces the weighted count, which is not 7 here
    mean = sftkey.linear_cross_entropy(h, w, y, **kw)
    assert abs(mean.item() - total[0].item() / 7) > 1e-3


@pytest.mark.parametrize("path,backend_name", [
    ("single_pass", "torch"), ("no_grad", "torch"),
    ("single_pass", "reference"),
])
def test_normalizer_one_element_tensor_gives_scalar_loss(path, backend_name):
    """A ``[1]`` normalizer passes validation (one element); the mean must still be 0-d (it used
    to come back shaped ``[1]``)."""
    h, w, b, y, g = _head(151)
    with torch.set_grad_enabled(path == "single_pass"):
        loss = sftkey.linear_cross_entropy(h, w, y, bias=b, normalizer=torch.tensor([7.0]), backend=backend_name)
        want = sftkey.linear_cross_entropy(h, w, y, bias=b, normalizer=7, backend=backend_name)
    assert loss.shape == ()
    assert_close(loss.detach(), want.detach(), F32, "loss")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="auto picks triton on CUDA")
def test_auto_backend_is_torch_on_cpu(monkeypatch):
    assert isinstance(resolve_backend("auto", torch.device("cpu"), torch.float32), TorchBackend)
    h, w, b, y, g = _head(160)
    spy = _Spy(monkeypatch, "torch")
    if triton_usable(DEVICE):  # the interpreter makes triton usable on CPU: auto must not pick it
        triton_cls = type(resolve_backend("triton", DEVICE, torch.float32))

        def refuse(*args, **kwargs):
            raise AssertionError("backend='auto' ran triton on CPU")

        for name in ("forward", "backward", "single_pass"):
            monkeypatch.setattr(triton_cls, name, refuse)
    auto = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, backend="auto"), [h, w, b])
    assert spy.calls["single_pass"] == 1
    explicit = _grads(sftkey.linear_cross_entropy(h, w, y, bias=b, backend="torch"), [h, w, b])
    assert torch.equal(auto[0], explicit[0])
    assert all(torch.equal(x, r) for x, r in zip(auto[1], explicit[1]))
    st = sftkey.logit_stats(h, w, y, bias=b)  # logit_stats' default is auto too
    assert_close(st.lse.detach(), sftkey.logit_stats(h, w, y, bias=b, backend="torch").lse.detach(), F32, "lse")
