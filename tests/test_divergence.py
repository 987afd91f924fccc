"""``sftkey.linear_divergence`` (forward KL, reverse KL, JSD) and ``linear_cross_entropy``'s
``anchor``, on the torch backend's two-head pass, against the float64 oracle on the same
values: every kind and reduction, every dtype, the odd shapes (N=1, V not a multiple of any
block, D not a power of two, D_ref != D), several groups of rows, ignored tokens, zero and
differentiable token weights, temperature, ``shift``, gradients to the policy's hidden,
weight and bias and, with ``ref_grad``, to the reference's."""
import pytest
import torch

import sftkey
from sftkey import config

from conftest import DEVICE, TOLERANCE, assert_close

KINDS = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: (lead, D, D_ref, V): N=1; odd V, D not a power of two; D_ref > D; a batch of sequences.
SHAPES = (((1,), 8, 8, 5), ((19,), 24, 10, 37), ((2, 9), 12, 20, 131))


def _pair(lead, d, d_ref, v, dtype, seed, bias=True, ignore_frac=0.25, ref_scale=1.0):
    """Policy and reference heads (leaves requiring grad; logits of order 1, the reference's
    different), targets with some ignored (at least one kept) and a generator."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()

    x, w = leaf(*lead, d), leaf(v, d, scale=1.5 / d ** 0.5)
    xr, wr = leaf(*lead, d_ref), leaf(v, d_ref, scale=ref_scale * 1.5 / d_ref ** 0.5)
    b, br = (leaf(v, scale=0.5), leaf(v, scale=0.5)) if bias else (None, None)
    y = torch.randint(0, v, lead, generator=g)
    mask = torch.rand(lead, generator=g) < ignore_frac
    mask.view(-1)[-1] = False
    y[mask] = -100
    return (x, w, b, xr, wr, br), y.to(DEVICE), g


def _run(fn, tensors, upstream, leaves_at):
    """``fn(*tensors)`` and the gradients of ``tensors[i]`` for ``i`` in ``leaves_at``."""
    loss = fn(*tensors)
    scalar = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    leaves = [tensors[i] for i in leaves_at]
    grads = torch.autograd.grad(scalar, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves)]


def _double(tensors):
    return tuple(None if t is None else t.detach().double().requires_grad_() for t in tensors)


def _divergence(tensors, y, **kw):
    x, w, b, xr, wr, br = tensors
    return sftkey.linear_divergence(x, w, xr, wr, y, bias=b, ref_bias=br, **kw)


def _compare(fn, tensors, y, dtype, upstream=None, what="", backend="torch", **kw):
    """``backend``'s loss and gradients against the oracle in float64 on the same values (the
    reference's too with ``ref_grad=True``, which goes on to ``fn``)."""
    leaves_at = [i for i, t in enumerate(tensors) if t is not None and (i < 3 or kw.get("ref_grad"))]
    got = _run(lambda *t: fn(t, y, backend=backend, **kw), tensors, upstream, leaves_at)
    want = _run(lambda *t: fn(t, y, backend="reference", **kw), _double(tensors), upstream, leaves_at)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got[0], want[0], dtype, f"{what} loss")
    for i, g, w in zip(leaves_at, got[1], want[1]):
        assert g.dtype == tensors[i].dtype
        assert_close(g, w, dtype, f"{what} grad {i}")


@pytest.fixture
def small_groups(monkeypatch):
    """A budget of a few rows per group, so that every shape but N=1 takes several groups."""
    monkeypatch.setattr(config, "chunk_budget_bytes", 16 * 37 * 4 * 8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-D{s[1]}-Dr{s[2]}-V{s[3]}")
def test_every_kind_and_reduction_matches_the_oracle(kind, reduction, shape, small_groups):
    tensors, y, g = _pair(*shape, torch.float32, seed=len(kind) * 7 + len(reduction) + shape[3])
    tw = torch.rand(y.shape, generator=g).to(DEVICE)
    upstream = torch.randn(y.shape, generator=g).to(DEVICE) if reduction == "none" else None
    _compare(_divergence, tensors, y, torch.float32, upstream, kind=kind, reduction=reduction, token_weights=tw,
             temperature=1.7, beta=0.3, what=f"{kind} {reduction}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_every_dtype(kind, dtype, small_groups):
    tensors, y, _ = _pair((2, 9), 12, 20, 131, dtype, seed=3)
    _compare(_divergence, tensors, y, dtype, kind=kind, what=f"{kind} {dtype}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradients_to_the_reference_when_asked(kind, reduction):
    tensors, y, g = _pair((11,), 12, 9, 37, torch.float64, seed=5)
    upstream = torch.randn(y.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    _compare(_divergence, tensors, y, torch.float64, upstream, ref_grad=True, kind=kind, reduction=reduction,
             temperature=0.8, what=f"{kind} {reduction} ref_grad")


def test_the_reference_is_frozen_by_default():
    (x, w, b, xr, wr, br), y, _ = _pair((6,), 8, 8, 11, torch.float32, seed=6)
    for backend in ("torch", "reference"):
        sftkey.linear_divergence(x, w, xr, wr, y, bias=b, ref_bias=br, backend=backend).backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None
    assert xr.grad is None and wr.grad is None and br.grad is None


def test_float64_matches_a_materialized_kl_div():
    """The oracle itself against ``F.kl_div`` (forward KL) and the JSD's definition, in float64."""
    (x, w, _, xr, wr, _), _, _ = _pair((13,), 8, 6, 23, torch.float64, seed=7, bias=False)
    T = 2.0
    logp = torch.log_softmax(x @ w.T / T, -1)
    logq = torch.log_softmax(xr @ wr.T / T, -1)
    want = torch.nn.functional.kl_div(logp, logq, log_target=True, reduction="sum")
    got = sftkey.linear_divergence(x, w, xr, wr, kind="forward_kl", temperature=T, reduction="sum", backend="torch")
    assert_close(got, want, torch.float64, "forward KL")
    want = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="sum")
    got = sftkey.linear_divergence(x, w, xr, wr, kind="reverse_kl", temperature=T, reduction="sum", backend="torch")
    assert_close(got, want, torch.float64, "reverse KL")
    beta = 0.25
    logm = torch.log(beta * logp.exp() + (1 - beta) * logq.exp())
    want = (beta * torch.nn.functional.kl_div(logm, logp, log_target=True, reduction="sum")
            + (1 - beta) * torch.nn.functional.kl_div(logm, logq, log_target=True, reduction="sum"))
    got = sftkey.linear_divergence(x, w, xr, wr, kind="jsd", beta=beta, temperature=T, reduction="sum",
                                   backend="torch")
    assert_close(got, want, torch.float64, "JSD")


@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_jsd_at_the_ends_of_beta_is_zero(beta):
    """``m`` is ``q`` at beta 0 and ``p`` at beta 1: both terms vanish (and stay finite)."""
    (x, w, b, xr, wr, br), y, _ = _pair((9,), 8, 8, 17, torch.float32, seed=8)
    loss = sftkey.linear_divergence(x, w, xr, wr, y, bias=b, ref_bias=br, kind="jsd", beta=beta, backend="torch")
    loss.backward()
    assert abs(loss.item()) < 1e-6 and float(x.grad.abs().max()) < 1e-6


def test_identical_heads_have_zero_divergence():
    (x, w, b, _, _, _), y, _ = _pair((9,), 8, 8, 17, torch.float64, seed=9)
    for kind in KINDS:
        loss = sftkey.linear_divergence(x, w, x, w, y, bias=b, ref_bias=b, kind=kind, backend="torch")
        assert abs(loss.item()) < 1e-12, kind


def test_targets_none_counts_every_position_and_shift_drops_the_last(small_groups):
    tensors, _, g = _pair((2, 9), 12, 20, 131, torch.float32, seed=10)
    tw = torch.rand((2, 9), generator=g).to(DEVICE)
    for shift in (False, True):
        _compare(_divergence, tensors, None, torch.float32, shift=shift, token_weights=tw, what=f"shift={shift}")
        none = _divergence(tensors, None, shift=shift, reduction="none", backend="torch")
        assert none.shape == (2, 9) and bool((none[:, -1] == 0).all()) == shift


def test_shift_ignored_tokens_and_normalizer():
    tensors, y, _ = _pair((3, 7), 12, 20, 67, torch.float32, seed=11, ignore_frac=0.5)
    _compare(_divergence, tensors, y, torch.float32, shift=True, normalizer=5.0, ignore_index=-100, what="shift")
    y0 = torch.where(y == -100, 0, y)
    _compare(_divergence, tensors, y0, torch.float32, ignore_index=0, kind="jsd", what="ignore_index=0")


def test_zero_weights_and_all_ignored():
    tensors, y, _ = _pair((3, 7), 12, 20, 67, torch.float32, seed=12)
    tw = torch.zeros(y.shape, device=DEVICE)
    tw[0, 2] = 2.0
    _compare(_divergence, tensors, y.fill_(3), torch.float32, token_weights=tw, what="one weighted token")
    x, w, b, xr, wr, br = tensors
    loss = sftkey.linear_divergence(x, w, xr, wr, torch.full_like(y, -100), bias=b, ref_bias=br, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and float(x.grad.abs().max()) == 0.0


def test_token_weights_that_need_a_gradient():
    tensors, y, g = _pair((11,), 12, 9, 37, torch.float64, seed=13)
    tw = torch.rand(y.shape, generator=g, dtype=torch.float64).requires_grad_()
    for backend in ("torch", "reference"):
        loss = _divergence(tensors, y, token_weights=tw, kind="reverse_kl", backend=backend)
        grad, = torch.autograd.grad(loss, tw)
        if backend == "torch":
            got = (loss.detach(), grad)
    assert_close(got[0], loss.detach(), torch.float64, "loss")
    assert_close(got[1], grad, torch.float64, "token_weights grad")


def test_no_grad_and_autocast():
    tensors, y, _ = _pair((11,), 12, 9, 37, torch.float32, seed=14)
    x, w, b, xr, wr, br = tensors
    want = _divergence(_double(tensors), y, backend="reference")
    with torch.no_grad():
        got = _divergence(tensors, y, backend="torch")
    assert_close(got, want.detach(), torch.float32, "no_grad")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = _divergence(tensors, y, backend="torch")
    cast = tuple(None if t is None else t.detach().to(torch.bfloat16) for t in tensors)
    assert_close(got.detach(), _divergence(_double(cast), y, backend="reference").detach(), torch.bfloat16, "autocast")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ({"dft": True}, {"label_smoothing": 0.1, "entropy_weights": 0.2, "z_loss": 1e-3},
                                     {"softcap": 4.0, "class_weights": "random"}, {"return_stats": True}),
                         ids=("dft", "smoothing-entropy-zloss", "softcap-class-weights", "stats"))
@pytest.mark.parametrize("kind", KINDS)
def test_anchored_cross_entropy_matches_ce_plus_weighted_divergence(kind, options, reduction, small_groups):
    """The combined loss equals the oracle's ``ce + anchor_weight * a_i * D_i``, and that oracle
    equals the two materialized losses added."""
    tensors, y, g = _pair((2, 9), 12, 20, 131, torch.float32, seed=15)
    x, w, b, xr, wr, br = tensors
    kw = dict(options)
    if kw.get("class_weights") == "random":
        kw["class_weights"] = torch.rand(131, generator=g).to(DEVICE)
    tw = torch.rand(y.shape, generator=g).to(DEVICE)
    tw.view(-1)[3] = 0
    upstream = torch.randn(y.shape, generator=g).to(DEVICE) if reduction == "none" else None
    anchor_kw = dict(anchor_weight=0.3, anchor_kind=kind, anchor_beta=0.4, token_weights=tw, reduction=reduction, **kw)

    def combined(t, y, backend, **kw):
        out = sftkey.linear_cross_entropy(t[0], t[1], y, bias=t[2], anchor=(t[3], t[4], t[5]), backend=backend, **kw)
        if not kw.get("return_stats"):
            return out
        loss, stats = out
        want_stats = sftkey.linear_cross_entropy(t[0], t[1], y, bias=t[2], backend="reference", **kw)[1]
        for name in ("lse", "entropy", "target_logprob"):
            assert_close(getattr(stats, name), getattr(want_stats, name).to(getattr(stats, name).dtype),
                         torch.float32, name)
        assert torch.equal(stats.predicted, want_stats.predicted)
        return loss

    _compare(combined, tensors, y, torch.float32, upstream, what=f"anchored {kind}", **anchor_kw)
    t64 = _double(tensors)
    oracle = combined(t64, y, "reference", **anchor_kw)
    plain = {k: v for k, v in anchor_kw.items() if not k.startswith("anchor") and k != "return_stats"}
    ce = sftkey.linear_cross_entropy(t64[0], t64[1], y, bias=t64[2], backend="reference",
                                     **{**plain, "reduction": "none"})
    d = sftkey.linear_divergence(t64[0], t64[1], t64[3], t64[4], y, bias=t64[2], ref_bias=t64[5], kind=kind,
                                 beta=0.4, reduction="none", backend="reference")
    if "softcap" not in kw:  # linear_divergence has no soft-cap; the anchor sees the capped policy logits
        per_token = ce + 0.3 * tw.double() * d
        if reduction == "none":
            want = per_token
        else:
            cw = kw.get("class_weights")
            denom = (tw.double() * (y != -100) * (1 if cw is None else cw.double()[y.clamp_min(0)])).sum()
            want = per_token.sum() / (denom if reduction == "mean" else 1)
        assert_close(oracle.detach(), want.detach(), torch.float64, "oracle = ce + lambda a D")


def test_anchor_is_frozen_and_refused_where_unsupported():
    (x, w, b, xr, wr, br), y, _ = _pair((6,), 8, 8, 11, torch.float32, seed=16)
    sftkey.linear_cross_entropy(x, w, y, bias=b, anchor=(xr, wr, br), anchor_weight=1.0, backend="torch").backward()
    assert w.grad is not None and xr.grad is None and wr.grad is None
    with pytest.raises(ValueError, match="anchor_kind='jsd' has no triton kernels"):
        sftkey.linear_cross_entropy(x, w, y, anchor=(xr, wr), anchor_kind="jsd", backend="triton")
    with pytest.raises(TypeError, match="anchor must be a tuple"):
        sftkey.linear_cross_entropy(x, w, y, anchor=[xr, wr])
    with pytest.raises(ValueError, match="anchor_kind"):
        sftkey.linear_cross_entropy(x, w, y, anchor=(xr, wr), anchor_kind="kl")
    with pytest.raises(ValueError, match="V=12 but weight has V=11"):
        sftkey.linear_cross_entropy(x, w, y, anchor=(xr, torch.zeros(12, 8)), anchor_weight=1.0)


def _args():
    (x, w, b, xr, wr, br), y, _ = _pair((6,), 8, 5, 11, torch.float32, seed=17)
    return x, w, xr, wr, y


@pytest.mark.parametrize("change, error, match", [
    (dict(kind="kl"), ValueError, "kind must be one of"),
    (dict(beta=1.5), ValueError, "beta must be <= 1"),
    (dict(beta=-0.1), ValueError, "beta must be >= 0"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature="2"), TypeError, "temperature must be a real number"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(normalizer=-1.0), ValueError, "normalizer must be >= |normalizer must be > 0"),
    (dict(ref_grad=1), TypeError, "ref_grad must be a bool"),
    (dict(backend="triton", kind="jsd"), ValueError, "kind='jsd' has no triton kernels"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(token_weights=torch.ones(5)), ValueError, "token_weights must have shape"),
    (dict(token_weights=-torch.ones(6)), ValueError, "token_weights must be >= 0"),
    (dict(label_smoothing=0.1), TypeError, "unexpected keyword arguments \\['label_smoothing'\\]"),
])
def test_bad_options_are_named(change, error, match):
    x, w, xr, wr, y = _args()
    with pytest.raises(error, match=match):
        sftkey.linear_divergence(x, w, xr, wr, y, **change)


@pytest.mark.parametrize("position, value, error, match", [
    (3, torch.zeros(12, 5), ValueError, "ref_weight has V=12 but weight has V=11"),
    (2, torch.zeros(7, 5), ValueError, "ref_hidden must have shape \\(6, 5\\)"),
    (2, torch.zeros(6, 4), ValueError, "ref_weight has D_ref=5 but ref_hidden has shape"),
    (3, torch.zeros(11, 5, dtype=torch.float64), TypeError, "ref_weight \\(torch.float64\\) and hidden"),
    (3, torch.zeros(11, 5, dtype=torch.long), TypeError, "ref_weight must be a floating-point tensor"),
    (2, [0.0], TypeError, "ref_hidden must be a torch.Tensor"),
    (3, torch.zeros(11), ValueError, "ref_weight must have shape \\[V, D_ref\\]"),
    (4, torch.zeros(6, 2, dtype=torch.long), ValueError, "targets must have shape"),
    (4, torch.full((6,), 11), ValueError, "targets must lie in"),
])
def test_bad_tensors_are_named(position, value, error, match):
    args = list(_args())
    args[position] = value
    with pytest.raises(error, match=match):
        sftkey.linear_divergence(*args)


def test_ref_bias_shape_and_oracle_signature():
    x, w, xr, wr, y = _args()
    with pytest.raises(ValueError, match="ref_bias must have shape \\(11,\\)"):
        sftkey.linear_divergence(x, w, xr, wr, y, ref_bias=torch.zeros(10))
    import inspect
    keywords = {p.name for p in inspect.signature(sftkey.reference.linear_divergence).parameters.values()
                if p.kind is p.KEYWORD_ONLY}
    assert keywords == {"bias", "ref_bias", *sftkey.DivergenceOptions.names()}
    assert set(sftkey.DivergenceOptions.names()) <= set(inspect.signature(sftkey.linear_divergence).parameters)
    assert TOLERANCE[torch.float64] < TOLERANCE[torch.float32]


def test_anchored_loss_with_weights_that_need_a_gradient_and_all_ignored():
    tensors, y, g = _pair((2, 9), 12, 20, 67, torch.float64, seed=18)
    x, w, b, xr, wr, br = tensors
    tw = torch.rand(y.shape, generator=g, dtype=torch.float64).requires_grad_()
    results = []
    for backend in ("torch", "reference"):
        loss = sftkey.linear_cross_entropy(x, w, y, bias=b, token_weights=tw, dft=True, anchor=(xr, wr, br),
                                           anchor_weight=0.2, backend=backend)
        results.append((loss.detach(), *torch.autograd.grad(loss, (x, w, tw))))
    for name, got, want in zip(("loss", "hidden", "weight", "token_weights"), *results):
        assert_close(got, want, torch.float64, name)
    ignored = torch.full_like(y, -100)
    loss = sftkey.linear_cross_entropy(x, w, ignored, bias=b, anchor=(xr, wr, br), anchor_weight=1.0, backend="torch")
    grad, = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and float(grad.abs().max()) == 0.0


def test_module_form_takes_an_anchor():
    (x, w, b, xr, wr, br), y, _ = _pair((6,), 8, 8, 11, torch.float64, seed=19)
    module = sftkey.LinearCrossEntropyLoss(anchor=(xr, wr), anchor_weight=0.5, backend="torch")
    want = sftkey.linear_cross_entropy(x, w, y, anchor=(xr, wr), anchor_weight=0.5, backend="reference")
    assert_close(module(x, w, y).detach(), want.detach(), torch.float64, "module")
    assert "anchor=<2 tensors>" in repr(module)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_anchored_cross_entropy_in_every_dtype(dtype, small_groups):
    tensors, y, _ = _pair((2, 9), 12, 20, 131, dtype, seed=20)

    def combined(t, y, backend, **kw):
        return sftkey.linear_cross_entropy(t[0], t[1], y, bias=t[2], anchor=(t[3], t[4], t[5]), backend=backend, **kw)

    _compare(combined, tensors, y, dtype, dft=True, anchor_weight=0.1, what=f"anchored {dtype}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck_both_heads(kind, reduction):
    """Finite differences in float64, both heads differentiable (``ref_grad``), temperature
    and bias on: the single pass and the recompute path."""
    tensors, y, _ = _pair((5,), 6, 4, 11, torch.float64, seed=21)

    def f(*t):
        return sftkey.linear_divergence(t[0], t[1], t[3], t[4], y, bias=t[2], ref_bias=t[5], kind=kind, beta=0.3,
                                        temperature=1.3, ref_grad=True, reduction=reduction, backend="torch")

    assert torch.autograd.gradcheck(f, tensors)
