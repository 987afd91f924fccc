"""``logit_stats`` and its fused backward against autograd through materialized logits, for
arbitrary upstream gradients on every statistic, so any custom per-token loss is exact."""
import pytest
import torch

import sftkey

from conftest import DEVICE, DTYPES, assert_close, make_head

DIFFERENTIABLE = ("lse", "target_logit", "expected_logit", "weighted_logit_sum")
CASES = [  # (N, D, V, bias, class weights, softcap, topk)
    (1, 16, 7, False, False, None, 3),
    (37, 40, 257, True, False, None, 16),
    (21, 24, 131, True, True, 3.0, 2),
    (40, 20, 97, False, True, None, 0),
]


def stats_and_grads(x, w, y, bias, c, softcap, topk, backend, seed):
    st = sftkey.logit_stats(x, w, y, bias=bias, class_weights=c, softcap=softcap, topk=topk, backend=backend)
    g = torch.Generator().manual_seed(seed)
    upstream = {name: torch.randn(y.shape, generator=g, dtype=torch.float64) for name in DIFFERENTIABLE}
    total = sum((getattr(st, name).double() * upstream[name]).sum() for name in DIFFERENTIABLE)
    leaves = [x, w] + ([bias] if bias is not None else [])
    return st, torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_statistics_and_backward(backend, dtype, case):
    n, d, v, has_bias, has_c, softcap, topk = CASES[case]
    x, w, bias, y = make_head(n, d, v, dtype, seed=100 + case, bias=has_bias)
    c = (torch.rand(v, generator=torch.Generator().manual_seed(case)) + 0.2).to(DEVICE) if has_c else None
    got, got_grads = stats_and_grads(x, w, y, bias, c, softcap, topk, backend, case)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    want, want_grads = stats_and_grads(x64, w64, y, b64, c, softcap, topk, "reference", case)
    for name in DIFFERENTIABLE:
        assert_close(getattr(got, name), getattr(want, name), dtype, f"{name} ({backend}, {dtype})")
    for name, g, r in zip(("dX", "dW", "db"), got_grads, want_grads):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"{name} ({backend}, {dtype})")
    assert_close(got.entropy, want.entropy, dtype, "entropy")
    assert_close(got.target_logprob, want.target_logprob, dtype, "target_logprob")
    assert torch.equal(got.valid, y != -100)
    assert torch.equal(got.target_logit[~got.valid], torch.zeros_like(got.target_logit[~got.valid]))
    if topk:
        assert got.topk.shape == (*y.shape, topk)
        assert_close(got.topk, want.topk, dtype, "topk")
    else:
        assert got.topk is None
    if dtype == torch.float32:
        assert torch.equal(got.argmax, want.argmax)


def test_custom_focal_loss(backend):
    """A per-token loss written by a caller on the statistics trains exactly."""
    x, w, _, y = make_head(24, 32, 101, torch.float32, seed=9)

    def focal(hidden, weight, be):
        st = sftkey.logit_stats(hidden, weight, y, backend=be)
        logp = st.target_logprob
        return (-((1 - logp.exp()) ** 2) * logp).sum()

    loss = focal(x, w, backend)
    grads = torch.autograd.grad(loss, [x, w])
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    want = focal(x64, w64, "reference")
    want_grads = torch.autograd.grad(want, [x64, w64])
    assert_close(loss, want, torch.float32, "focal loss")
    for g, r in zip(grads, want_grads):
        assert_close(g, r, torch.float32, "focal grad")
