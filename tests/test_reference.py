"""The oracle, ``sftkey.reference.linear_cross_entropy``, held to independent definitions in
float64: ``torch.nn.functional.cross_entropy`` on materialized logits for every option torch
has, and, for the terms torch lacks (entropy, z-loss, DFT, token weights, ``normalizer``,
softcap), autograd of docs/design.md's formula written out here on materialized logits.
Loss and the gradients of hidden, weight and bias."""
import math

import pytest
import torch
import torch.nn.functional as F

from sftkey import reference

from conftest import assert_close

F64 = torch.float64
D, V = 12, 23


def _inputs(seed, lead=(17,), bias=True, ignore_frac=0.25, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, D, generator=g, dtype=F64)
    w = torch.randn(V, D, generator=g, dtype=F64) * (1.5 / D ** 0.5)
    b = torch.randn(V, generator=g, dtype=F64) * 0.5 if bias else None
    y = torch.randint(0, V, lead, generator=g)
    mask = torch.rand(lead, generator=g) < ignore_frac
    mask.view(-1)[0], mask.view(-1)[-1] = True, False  # at least one ignored and one valid token
    y[mask] = ignore_index
    leaves = [t.requires_grad_() for t in (h, w, b) if t is not None]
    return h, w, b, y, leaves, g


def _logits(h, w, b, softcap=None):
    z = h @ w.T
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _loss_and_grads(loss, leaves, upstream=None):
    """The loss and the gradients of ``leaves``; a non-scalar loss is contracted with ``upstream``."""
    scalar = loss if upstream is None else (loss * upstream).sum()
    grads = torch.autograd.grad(scalar, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(l) if g is None else g for g, l in zip(grads, leaves)]


def _check(got, want, what):
    (gl, gg), (wl, wg) = got, want
    assert gl.dtype == F64
    assert_close(gl, wl, F64, f"{what}: loss")
    for i, (a, b) in enumerate(zip(gg, wg)):
        assert_close(a, b, F64, f"{what}: grad of {['hidden', 'weight', 'bias'][i]}")


# --------------------------------------------------------------------------- against F.cross_entropy

TORCH_CASES = {
    # name: (input kwargs, option kwargs)
    "plain": (dict(bias=False), {}),
    "bias": ({}, {}),
    "class_weights": ({}, dict(class_weights=True)),
    "label_smoothing": ({}, dict(label_smoothing=0.2)),
    "label_smoothing_full": ({}, dict(label_smoothing=1.0)),
    "smoothing_and_class_weights": ({}, dict(label_smoothing=0.3, class_weights=True)),
    "ignore_index_0": (dict(ignore_index=0), dict(ignore_index=0)),
    "ignore_index_0_smoothing_class_weights": (dict(ignore_index=0), dict(ignore_index=0, label_smoothing=0.1,
                                                                          class_weights=True)),
    "no_ignored": (dict(ignore_frac=0.0), {}),
    "int32": ({}, dict(int32=True)),
    "multidim": (dict(lead=(3, 7)), {}),
    "multidim_everything": (dict(lead=(2, 3, 4)), dict(class_weights=True, label_smoothing=0.15, int32=True)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_cross_entropy(case, reduction):
    seed = 100 + sorted(TORCH_CASES).index(case) * 3 + ["mean", "sum", "none"].index(reduction)
    inp_kw, opt = TORCH_CASES[case]
    opt = dict(opt)
    h, w, b, y, leaves, g = _inputs(seed, **inp_kw)
    ignore_index = opt.get("ignore_index", -100)
    if ignore_index == 0:
        assert (y == 0).any() and (y != 0).any()
    cw = torch.rand(V, generator=g, dtype=F64) + 0.2 if opt.pop("class_weights", False) else None
    int32 = opt.pop("int32", False)
    upstream = torch.randn(y.shape, generator=g, dtype=F64) if reduction == "none" else None

    ours = reference.linear_cross_entropy(h, w, y.int() if int32 else y, bias=b, class_weights=cw,
                                          reduction=reduction, **opt)
    z = _logits(h, w, b)
    if z.dim() > 2:  # torch's layout for extra dimensions: [B, V, d1, ...]
        z = z.movedim(-1, 1)
    want = F.cross_entropy(z, y, weight=cw, reduction=reduction, **opt)
    assert ours.shape == want.shape == (y.shape if reduction == "none" else ())
    _check(_loss_and_grads(ours, leaves, upstream), _loss_and_grads(want, leaves, upstream), case)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, dict(class_weights=True, label_smoothing=0.2)], ids=["plain", "weighted"])
def test_all_ignored(reduction, opts):
    """torch's mean over zero tokens is 0/0 = NaN; the contract's is 0, with zero gradients."""
    h, w, b, y, leaves, g = _inputs(200 + len(opts) + ["mean", "sum", "none"].index(reduction), lead=(3, 5))
    y = torch.full_like(y, -100)
    cw = torch.rand(V, generator=g, dtype=F64) + 0.2 if opts.get("class_weights") else None
    ls = opts.get("label_smoothing", 0.0)
    ours = reference.linear_cross_entropy(h, w, y, bias=b, class_weights=cw, label_smoothing=ls, reduction=reduction)
    torch_loss = F.cross_entropy(_logits(h, w, b).movedim(-1, 1), y, weight=cw, label_smoothing=ls,
                                 reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(torch_loss)
    else:
        assert torch.all(torch_loss == 0)
    assert ours.shape == torch_loss.shape
    assert torch.all(ours == 0)
    ours.sum().backward()
    for t in leaves:
        assert t.grad is not None and torch.all(t.grad == 0), "ignored tokens must give zero (not NaN) gradients"


# --------------------------------------------------------------------------- against the formula


def formula(h, w, b, y, *, ignore_index=-100, class_weights=None, label_smoothing=0.0, token_weights=None,
            entropy_weights=None, z_loss=0.0, dft=False, softcap=None, reduction="mean", normalizer=None):
    """docs/design.md's per-token loss on materialized logits, reduced; independent of sftkey."""
    z = _logits(h, w, b, softcap)
    n_class = z.shape[-1]
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    valid = y != ignore_index
    yc = torch.where(valid, y, torch.zeros_like(y)).long()
    logp_y = logp.gather(-1, yc[..., None])[..., 0]
    cw = torch.ones(n_class, dtype=z.dtype) if class_weights is None else class_weights
    ce = (1 - label_smoothing) * (-logp_y * cw[yc]) + label_smoothing * (-(logp * cw).sum(-1) / n_class)
    a = torch.ones_like(ce) if token_weights is None else token_weights
    s = logp_y.exp().detach() if dft else 1.0
    lse = torch.logsumexp(z, dim=-1)
    entropy = -(p * logp).sum(-1)
    e = 0.0 if entropy_weights is None else entropy_weights
    loss = a * s * ce + z_loss * lse ** 2 - e * entropy
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if normalizer is not None:
        return loss.sum() / normalizer
    denom = (a * cw[yc] * valid).sum()
    return loss.sum() / (denom if denom != 0 else 1)


FORMULA_CASES = {
    "entropy_scalar": dict(entropy_weights=0.3),
    "entropy_negative": dict(entropy_weights=-0.7),
    "entropy_per_token": dict(entropy_weights="per_token"),
    "entropy_0d_tensor": dict(entropy_weights="0d"),
    "z_loss": dict(z_loss=1e-2),
    "dft": dict(dft=True),
    "dft_smoothing_class_weights": dict(dft=True, label_smoothing=0.1, class_weights=True),
    "token_weights": dict(token_weights=True),
    "token_weights_class_weights": dict(token_weights=True, class_weights=True),
    "token_weights_some_zero": dict(token_weights="some_zero"),
    "normalizer_int": dict(normalizer=7),
    "normalizer_float": dict(normalizer=2.5),
    "normalizer_tensor": dict(normalizer="tensor"),
    "normalizer_with_weights": dict(normalizer=11, token_weights=True, class_weights=True),
    "softcap": dict(softcap=2.0),
    "softcap_smoothing": dict(softcap=1.5, label_smoothing=0.2, class_weights=True),
    "everything": dict(entropy_weights="per_token", z_loss=3e-3, dft=True, token_weights=True, class_weights=True,
                       label_smoothing=0.05, softcap=3.0),
    "everything_ignore_0": dict(entropy_weights=0.2, z_loss=1e-3, token_weights=True, class_weights=True,
                                label_smoothing=0.1, ignore_index=0),
}


def _materialize_options(opts, y, g):
    opts = dict(opts)
    shape = y.shape
    if opts.get("entropy_weights") == "per_token":
        opts["entropy_weights"] = torch.rand(shape, generator=g, dtype=F64) - 0.3
    elif opts.get("entropy_weights") == "0d":
        opts["entropy_weights"] = torch.tensor(0.4, dtype=F64)
    if opts.get("token_weights") is True:
        opts["token_weights"] = torch.rand(shape, generator=g, dtype=F64) * 2
    elif opts.get("token_weights") == "some_zero":
        a = torch.rand(shape, generator=g, dtype=F64) + 0.5
        a.view(-1)[::3] = 0
        opts["token_weights"] = a
    if opts.get("class_weights"):
        opts["class_weights"] = torch.rand(V, generator=g, dtype=F64) + 0.2
    if opts.get("normalizer") == "tensor":
        opts["normalizer"] = torch.tensor(6.0, dtype=F64)
    return opts


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", sorted(FORMULA_CASES))
def test_matches_formula(case, reduction):
    seed = 300 + sorted(FORMULA_CASES).index(case) * 3 + ["mean", "sum", "none"].index(reduction)
    ignore_index = FORMULA_CASES[case].get("ignore_index", -100)
    h, w, b, y, leaves, g = _inputs(seed, lead=(3, 6), ignore_index=ignore_index)
    opts = _materialize_options(FORMULA_CASES[case], y, g)
    upstream = torch.randn(y.shape, generator=g, dtype=F64) if reduction == "none" else None
    ours = reference.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, **opts)
    want = formula(h, w, b, y, reduction=reduction, **opts)
    assert ours.shape == want.shape
    _check(_loss_and_grads(ours, leaves, upstream), _loss_and_grads(want, leaves, upstream), case)


def test_formula_terms_are_not_vacuous():
    """Each option the formula tests cover moves the loss: a reference that ignored it would fail."""
    h, w, b, y, leaves, g = _inputs(400, lead=(3, 6))
    base = reference.linear_cross_entropy(h, w, y, bias=b).item()
    for case, opts in FORMULA_CASES.items():
        if "ignore_index" in opts:
            continue
        opts = _materialize_options(opts, y, g)
        got = reference.linear_cross_entropy(h, w, y, bias=b, **opts).item()
        assert abs(got - base) > 1e-4 * abs(base), case


def test_token_weight_mean_denominator():
    """``mean`` with token weights is ``sum_i a_i l_i / sum_i a_i`` over non-ignored tokens (not the
    token count, and not including the ignored tokens' weights)."""
    h, w, b, y, leaves, g = _inputs(401, lead=(20,))
    a = torch.rand(20, generator=g, dtype=F64) + 0.1
    valid = y != -100
    per_token = reference.linear_cross_entropy(h, w, y, bias=b, reduction="none")
    got = reference.linear_cross_entropy(h, w, y, bias=b, token_weights=a)
    want = (a * per_token).sum() / a[valid].sum()
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    assert abs(got.item() - (a * per_token).sum().item() / valid.sum().item()) > 1e-6


def test_z_loss_applies_to_zero_weight_tokens():
    """Per the contract, ``zeta * lse^2`` is not multiplied by ``a_i``: a token with weight 0 still
    gets the z-loss gradient, and no cross-entropy gradient."""
    h, w, b, y, leaves, g = _inputs(402, lead=(8,), ignore_frac=0.0)
    a = torch.ones(8, dtype=F64)
    a[2] = 0
    ours = reference.linear_cross_entropy(h, w, y, bias=b, token_weights=a, z_loss=0.1, reduction="none")
    lse = torch.logsumexp(_logits(h, w, b), -1)
    assert abs(ours[2].item() - 0.1 * lse[2].item() ** 2) < 1e-12
    (gh,) = torch.autograd.grad(ours[2], [h])
    (want,) = torch.autograd.grad(0.1 * lse[2] ** 2, [h])
    assert_close(gh, want, F64, "z-loss grad of a zero-weight token")
    assert gh[2].abs().max() > 0


def test_gradients_of_token_and_entropy_weights():
    """token_weights and entropy_weights are differentiable in the oracle (through the loss and the
    weighted-mean denominator)."""
    h, w, b, y, leaves, g = _inputs(403, lead=(2, 9))
    a = (torch.rand(y.shape, generator=g, dtype=F64) + 0.2).requires_grad_()
    e = (torch.rand(y.shape, generator=g, dtype=F64) * 0.5).requires_grad_()
    cw = torch.rand(V, generator=g, dtype=F64) + 0.2
    kw = dict(token_weights=a, entropy_weights=e, class_weights=cw, z_loss=1e-3, label_smoothing=0.1)
    ours = torch.autograd.grad(reference.linear_cross_entropy(h, w, y, bias=b, **kw), [a, e, *leaves])
    want = torch.autograd.grad(formula(h, w, b, y, **kw), [a, e, *leaves])
    for name, o, t in zip(["token_weights", "entropy_weights", "hidden", "weight", "bias"], ours, want):
        assert_close(o, t, F64, f"grad of {name}")


def test_return_stats_match_formula():
    h, w, b, y, leaves, g = _inputs(404, lead=(3, 7))
    z = _logits(h, w, b).detach()
    y[0, :3] = z[0, :3].argmax(-1)  # make some predictions correct
    loss, st = reference.linear_cross_entropy(h, w, y, bias=b, return_stats=True, reduction="sum")
    assert_close(loss, formula(h, w, b, y, reduction="sum"), F64, "loss with return_stats")
    valid = y != -100
    logp = torch.log_softmax(z, -1)
    lse = torch.logsumexp(z, -1)
    logp_y = torch.where(valid, logp.gather(-1, y.clamp_min(0)[..., None])[..., 0], torch.zeros_like(lse))
    for name, got, want in [("lse", st.lse, lse), ("entropy", st.entropy, -(logp.exp() * logp).sum(-1)),
                            ("target_logprob", st.target_logprob, logp_y)]:
        assert got.shape == y.shape and not got.requires_grad
        assert_close(got, want, F64, name)
    correct = (z.argmax(-1) == y) & valid
    assert st.correct.dtype == torch.bool and st.correct.shape == y.shape
    assert torch.equal(st.correct, correct)
    assert 3 <= int(correct.sum()) < int(valid.sum())


def test_float32_inputs_give_float32_loss():
    """The oracle computes in the accumulation dtype: float32 for float32 inputs."""
    h, w, b, y, leaves, g = _inputs(405)
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (h, w, b))
    loss = reference.linear_cross_entropy(h32, w32, y, bias=b32)
    assert loss.dtype == torch.float32
    loss.backward()
    assert h32.grad.dtype == w32.grad.dtype == b32.grad.dtype == torch.float32
    want = F.cross_entropy(_logits(h, w, b), y)
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)
