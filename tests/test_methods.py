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
    "sftkey": (lambda st, a: methods.sftkey(st, a), lambda lp, H, m2, v, a: -lp * a),
    "cft": (lambda st, a: methods.cft(st, a > 0.5), lambda lp, H, m2, v, a: -lp * (a > 0.5)),
    "dft": (lambda st, a: methods.dft(st), lambda lp, H, m2, v, a: -lp * lp.detach().exp()),
    "sed_sft": (lambda st, a: methods.sed_sft(st, lam=0.7, threshold=0.5),
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
    extra = methods.sed_sft(st, lam=1.0, threshold=threshold) - methods.sft(st)
    assert 0 < int((extra > 0).sum()) < int(valid.sum())


def test_sed_sft_needs_topk():
    h, w, b, y, _ = _inputs()
    with pytest.raises(ValueError, match="topk=2"):
        methods.sed_sft(sftkey.logit_stats(h, w, y))


def test_reduce_means_over_valid_tokens_weights_and_normalizer():
    h, w, b, y, a = _inputs()
    st = sftkey.logit_stats(h, w, y, bias=b)
    losses = methods.sftkey(st, a)
    valid = y != -100
    torch.testing.assert_close(methods.reduce(losses, st), losses.sum() / valid.sum())
    torch.testing.assert_close(methods.reduce(losses, st, weights=a), losses.sum() / a[valid].sum())
    torch.testing.assert_close(methods.reduce(losses, st, normalizer=4), losses.sum() / 4)
    torch.testing.assert_close(methods.reduce(losses, st, reduction="sum"), losses.sum())
    assert methods.reduce(losses, st, reduction="none") is losses
    # sftkey reduced by its own weights is linear_cross_entropy with token_weights
    fused = sftkey.linear_cross_entropy(h, w, y, bias=b, token_weights=a)
    torch.testing.assert_close(methods.reduce(losses, st, weights=a), fused)
    with pytest.raises(ValueError, match="reduction"):
        methods.reduce(losses, st, reduction="avg")


def test_reduce_all_ignored_is_zero_with_zero_grads():
    h, w, b, y, _ = _inputs()
    y = torch.full_like(y, -100)
    st = sftkey.logit_stats(h, w, y, bias=b)
    loss = methods.reduce(methods.focal(st) + methods.entropy_bonus(st, 0.1), st)
    loss.backward()
    assert loss.item() == 0
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_bad_weights_shape_is_refused():
    h, w, b, y, a = _inputs()
    st = sftkey.logit_stats(h, w, y)
    with pytest.raises(ValueError, match="token_weights"):
        methods.sftkey(st, a[:, :-1])
