"""``torch.compile`` of the public functions: traced whole (``fullgraph=True``, no graph
breaks), the same results as eager, and the checks that read the targets still raised."""
import pytest
import torch

import sftkey
from sftkey.backends.torch import TorchBackend

from conftest import assert_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 16, generator=g).requires_grad_()
    w = (torch.randn(37, 16, generator=g) / 4).requires_grad_()
    b = (torch.randn(37, generator=g) * 0.5).requires_grad_() if bias else None
    y = torch.randint(0, 37, (2, 6), generator=g)
    y[0, 1] = y[1, 3] = -100
    return x, w, b, y, torch.rand(2, 6, generator=g)


def _grads(out, leaves):
    return torch.autograd.grad(out.sum(), [t for t in leaves if t is not None])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fullgraph_matches_eager(reduction):
    x, w, b, y, tw = _inputs()

    def loss(x, w, y, b, tw):
        return sftkey.linear_cross_entropy(x, w, y, bias=b, token_weights=tw, reduction=reduction, shift=True,
                                           label_smoothing=0.1, entropy_weights=0.1, z_loss=1e-3, backend="torch")

    eager, compiled = loss(x, w, y, b, tw), torch.compile(loss, fullgraph=True)(x, w, y, b, tw)
    assert_close(compiled, eager.detach(), torch.float32, "loss")
    for got, want in zip(_grads(compiled, (x, w, b)), _grads(eager, (x, w, b))):
        assert_close(got, want, torch.float32, "gradient")


def test_fullgraph_return_stats_and_normalizer():
    x, w, b, y, _ = _inputs(1, bias=False)

    def loss(x, w, y):
        return sftkey.linear_cross_entropy(x, w, y, normalizer=torch.tensor(7.0), return_stats=True, backend="torch")

    (got, got_stats), (want, want_stats) = torch.compile(loss, fullgraph=True)(x, w, y), loss(x, w, y)
    assert_close(got, want.detach(), torch.float32, "loss")
    for name in ("lse", "entropy", "target_logprob"):
        assert_close(getattr(got_stats, name), getattr(want_stats, name), torch.float32, name)
    assert torch.equal(got_stats.correct, want_stats.correct)


def test_fullgraph_logit_stats_with_a_custom_loss():
    x, w, _, y, _ = _inputs(2, bias=False)

    def focal(x, w, y):
        st = sftkey.logit_stats(x, w, y, topk=2, backend="torch")
        return -((1 - st.target_logprob.exp()) ** 2 * st.target_logprob).sum() + st.topk.sum().detach()

    got, want = torch.compile(focal, fullgraph=True)(x, w, y), focal(x, w, y)
    assert_close(got, want.detach(), torch.float32, "loss")
    for g, r in zip(_grads(got, (x, w)), _grads(want, (x, w))):
        assert_close(g, r, torch.float32, "gradient")


def test_no_graph_breaks():
    x, w, b, y, tw = _inputs(3)
    explained = torch._dynamo.explain(lambda x, w, y, tw: sftkey.linear_cross_entropy(x, w, y, token_weights=tw,
                                                                                       backend="torch"))(x, w, y, tw)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_bad_targets_still_raise_when_compiled():
    x, w, _, y, _ = _inputs(4, bias=False)
    y[0, 0] = 99
    for reduction in ("mean", "none"):
        fn = torch.compile(lambda x, w, y: sftkey.linear_cross_entropy(x, w, y, reduction=reduction, backend="torch"),
                           fullgraph=True)
        with pytest.raises(ValueError, match="targets must lie in"):
            fn(x, w, y)


def test_backend_instance_is_refused_when_compiled():
    x, w, _, y, _ = _inputs(5, bias=False)
    fn = torch.compile(lambda x, w, y: sftkey.linear_cross_entropy(x, w, y, backend=TorchBackend()), fullgraph=True)
    with pytest.raises(Exception, match="pass the backend by name"):  # Dynamo wraps what tracing raises
        fn(x, w, y)
