"""sftkey.methods against formulas on materialized float64 logits: values and gradients."""
import pytest
import torch

import sftkey
from sftkey import methods

B, T, D, V = 3, 7, 16, 29


def _inputs(seed=0, softcap=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = -100
    y[2, -1] = -100
    a = torch.rand(B, T, generator=g, dtype=torch.float64)
    return h, w, b, y, a


def _materialized(h, w, b, y, softcap=None):
    """Per-token log p_y, p_y, entropy, top-2 mass and valid mask from full logits."""
    z = h @ w.T + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp_all = torch.log_softmax(z, -1)
    valid = y != -100
    logp = logp_all.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    p_all = logp_all.exp()
    entropy = -(p_all * logp_all).sum(-1)
    top2 = p_all.topk(2, dim=-1).values.sum(-1)
    return logp, entropy, top2, valid


def _zero_ignored(loss, valid):
    return torch.where(valid, loss, torch.zeros_like(loss))


REFS = {
    "sft": (lambda st, a: methods.sft(st), lambda lp, H, m2, v, a: -lp),
    "sft_weighted": (lambda st, a: methods.reduce(methods.sft(st), st, token_weights=a, reduction="none"),
                     lambda lp, H, m2, v, a: -lp * a),
    "dft": (lambda st, a: methods.dft(st), lambda lp, H, m2, v, a: -lp * lp.detach().exp()),
    "sed_sft": (lambda st, a: methods.sed_sft(st, lam=0.7, threshold=0.5, k=2),
                lambda lp, H, m2, v, a: -lp + 0.7 * ((m2 < 0.5) & v) * (lp.exp() - 0.5) ** 2),
    "entropy_bonus": (lambda st, a: methods.entropy_bonus(st, 0.3, a),
                      lambda lp, H, m2, v, a: _zero_ignored(-0.3 * a * H, v)),
    "focal": (lambda st, a: methods.focal(st, gamma=2.0),
              lambda lp, H, m2, v, a: -(1 - lp.exp()) ** 2 * lp),
}


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("name", sorted(REFS))
def test_preset_matches_materialized_logits(name, softcap):
    ours, ref = REFS[name]
    h, w, b, y, a = _inputs(softcap=softcap)
    st = sftkey.logit_stats(h, w, y, bias=b, softcap=softcap, topk=2, backend="torch")
    got = ours(st, a)
    params = (h, w, b)
    upstream = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad((got * upstream).sum(), params)

    lp, H, m2, valid = _materialized(h, w, b, y, softcap)
    want = ref(lp, H, m2, valid, a)
    want_grads = torch.autograd.grad((want * upstream).sum(), params)

    assert got.shape == y.shape
    assert torch.all(got[~valid] == 0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def test_sed_sft_selects_some_but_not_all_tokens():
    h, w, b, y, _ = _inputs()
    st = sftkey.logit_stats(h, w, y, bias=b, topk=2)
    *_, m2, valid = _materialized(h, w, b, y)
    threshold = m2[valid].median().item()
    extra = methods.sed_sft(st, lam=1.0, threshold=threshold, k=2) - methods.sft(st)
    assert 0 < int((extra > 0).sum()) < int(valid.sum())


def test_sed_sft_needs_topk():
    h, w, b, y, _ = _inputs()
    with pytest.raises(ValueError, match="topk=10"):
        methods.sed_sft(sftkey.logit_stats(h, w, y))


def test_reduce_means_over_valid_tokens_weights_and_normalizer():
    h, w, b, y, a = _inputs()
    st = sftkey.logit_stats(h, w, y, bias=b)
    losses = methods.sft(st)
    valid = y != -100
    torch.testing.assert_close(methods.reduce(losses, st), losses.sum() / valid.sum())
    weighted = (losses * a).sum()
    torch.testing.assert_close(methods.reduce(losses, st, token_weights=a), weighted / a[valid].sum())
    torch.testing.assert_close(methods.reduce(losses, st, normalizer=4), losses.sum() / 4)
    torch.testing.assert_close(methods.reduce(losses, st, token_weights=a, normalizer=4), weighted / 4)
    torch.testing.assert_close(methods.reduce(losses, st, reduction="sum"), losses.sum())
    torch.testing.assert_close(methods.reduce(losses, st, token_weights=a, reduction="sum"), weighted)
    assert methods.reduce(losses, st, reduction="none") is losses
    torch.testing.assert_close(methods.reduce(losses, st, token_weights=a, reduction="none"), losses * a)
    with pytest.raises(ValueError, match="reduction"):
        methods.reduce(losses, st, reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_normalization_for_both_routes(reduction):
    """SFTKey's blend (chain at 0.3, key at 1, the rest ignored) gives the same loss through
    methods.reduce as through linear_cross_entropy's token_weights, DFT too."""
    h, w, b, y, _ = _inputs(seed=3)
    a = torch.where(torch.rand(B, T, generator=torch.Generator().manual_seed(2)) < 0.3, 1.0, 0.3).double()
    for preset, options in ((methods.sft, {}), (methods.dft, {"dft": True})):
        st = sftkey.logit_stats(h, w, y, bias=b)
        got = methods.reduce(preset(st), st, token_weights=a, reduction=reduction)
        want = sftkey.linear_cross_entropy(h, w, y, bias=b, token_weights=a, reduction=reduction, **options)
        torch.testing.assert_close(got, want)
        for g, r in zip(torch.autograd.grad(got.sum(), (h, w)), torch.autograd.grad(want.sum(), (h, w))):
            torch.testing.assert_close(g, r)


def test_reduce_all_ignored_is_zero_with_zero_grads():
    h, w, b, y, _ = _inputs()
    y = torch.full_like(y, -100)
    st = sftkey.logit_stats(h, w, y, bias=b)
    loss = methods.reduce(methods.focal(st) + methods.entropy_bonus(st, 0.1), st)
    loss.backward()
    assert loss.item() == 0
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_bad_weights_are_refused():
    h, w, b, y, a = _inputs()
    st = sftkey.logit_stats(h, w, y)
    with pytest.raises(ValueError, match="token_weights"):
        methods.reduce(methods.sft(st), st, token_weights=a[:, :-1])
    for bad in (float("inf"), -1.0, float("nan")):
        a2 = a.clone()
        a2[1, 1] = bad
        with pytest.raises(ValueError, match="token_weights must be >= 0 and finite"):
            methods.reduce(methods.sft(st), st, token_weights=a2)


def test_sed_sft_defaults_are_the_authors_sed_triton_run():
    import inspect
    params = inspect.signature(methods.sed_sft).parameters
    run = methods.SED_SFT_SETTINGS["sed_triton"]
    assert (params["lam"].default, params["k"].default, params["threshold"].default) == (run.lam, run.k, run.threshold)
    h, w, b, y, _ = _inputs()
    st = sftkey.logit_stats(h, w, y, bias=b, topk=10)
    torch.testing.assert_close(methods.sed_sft(st), methods.sed_sft(st, lam=1.0, threshold=0.95, k=10))


def test_entropy_weights_of_either_sign():
    """``-e H``: e > 0 rewards entropy, e < 0 penalizes it (entropy minimization); the preset
    and linear_cross_entropy's entropy_weights agree on both signs."""
    h, w, b, y, _ = _inputs()
    for e in (0.3, -0.3):
        st = sftkey.logit_stats(h, w, y, bias=b)
        got = methods.reduce(methods.sft(st) + methods.entropy_bonus(st, e), st)
        want = sftkey.linear_cross_entropy(h, w, y, bias=b, entropy_weights=e)
        torch.testing.assert_close(got, want)
        grad_h, = torch.autograd.grad(methods.reduce(methods.entropy_bonus(st, e), st), h)
        with torch.no_grad():  # a small step along -grad moves the entropy the way the sign says
            st2 = sftkey.logit_stats(h - 1e-3 * grad_h, w, y, bias=b)
        moved = (st2.entropy - st.entropy.detach())[y != -100].sum()
        assert (moved > 0) == (e > 0)


def test_infinite_token_weights_are_refused():
    """An inf weight made the mean inf / inf = NaN without an error."""
    h, w, b, y, a = _inputs()
    a = a.clone()
    a[0, 4] = float("inf")
    with pytest.raises(ValueError, match="token_weights must be >= 0 and finite.*found inf"):
        sftkey.linear_cross_entropy(h, w, y, bias=b, token_weights=a, backend="torch")
    with pytest.raises(ValueError, match="token_weights must be >= 0 and finite.*found inf"):
        sftkey.linear_divergence(h, w, h.detach(), w.detach() * 0.5, y, token_weights=a, backend="torch")


def test_infinite_entropy_weights_are_refused():
    """A non-finite entropy weight (a tensor, or a number) made the loss inf or NaN."""
    h, w, b, y, _ = _inputs()
    e = torch.full(y.shape, 0.1)
    e[0, 3] = float("nan")
    with pytest.raises(ValueError, match="entropy_weights must be finite.*found nan"):
        sftkey.linear_cross_entropy(h, w, y, bias=b, entropy_weights=e, backend="torch")
    with pytest.raises(ValueError, match="entropy_weights must be finite"):
        sftkey.linear_cross_entropy(h, w, y, bias=b, entropy_weights=float("-inf"), backend="torch")
