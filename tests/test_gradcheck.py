"""``torch.autograd.gradcheck`` in float64 on tiny shapes for the torch backend: both the
single pass (scalar reductions) and the recompute path, entropy and softcap included."""
import pytest
import torch

import sftkey

OPTIONS = [
    dict(),
    dict(entropy_weights=0.7, softcap=2.5),
    dict(label_smoothing=0.2, z_loss=0.05, softcap=1.5),
    dict(label_smoothing=0.1, entropy_weights=-0.3),
]


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3, -100, 0, 10, 7])
    return x, w, b, y, g


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("k", range(len(OPTIONS)))
def test_gradcheck_loss(reduction, k):
    x, w, b, y, g = inputs(k)
    tw = torch.rand(5, generator=g, dtype=torch.float64)
    cw = torch.rand(11, generator=g, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return sftkey.linear_cross_entropy(x, w, y, bias=b, token_weights=tw, class_weights=cw,
                                           reduction=reduction, backend="torch", **OPTIONS[k])

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradcheck_logit_stats():
    x, w, b, y, g = inputs(42)
    c = torch.rand(11, generator=g, dtype=torch.float64)

    def f(x, w, b):
        st = sftkey.logit_stats(x, w, y, bias=b, class_weights=c, softcap=3.0, backend="torch")
        return st.lse, st.target_logit, st.expected_logit, st.weighted_logit_sum

    assert torch.autograd.gradcheck(f, (x, w, b))
