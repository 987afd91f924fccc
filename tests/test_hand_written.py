"""The fast paths against a loss written out by hand, token by token, with loops over the
batch and the positions: a shift or flattening bug shared by the code and its oracle would
pass the parity tests, not this one."""
import math

import pytest
import torch

import sftkey

from conftest import backends


def hand_written(hidden, weight, labels, token_weights, entropy_weights, ignore_index=-100):
    """Mean over the predictions ``t -> labels[b, t + 1]`` of ``a * ce - e * H``, divided by the
    sum of ``a`` over the labelled predictions; every term by hand, in float64."""
    B, T, _ = hidden.shape
    total = denom = 0.0
    for b in range(B):
        for t in range(T - 1):
            target = int(labels[b, t + 1])
            if target == ignore_index:
                continue
            z = [float(hidden[b, t].double() @ weight[j].double()) for j in range(weight.shape[0])]
            top = max(z)
            lse = top + math.log(sum(math.exp(v - top) for v in z))
            p = [math.exp(v - lse) for v in z]
            entropy = -sum(q * math.log(q) for q in p if q > 0)
            a, e = float(token_weights[b, t + 1]), float(entropy_weights[b, t + 1])
            total += a * (lse - z[target]) - e * entropy
            denom += a
    return total / denom


@pytest.mark.parametrize("reduction_path", ["single_pass", "recompute"])
@pytest.mark.parametrize("backend", backends())
def test_shifted_weighted_loss_matches_a_hand_written_one(backend, reduction_path):
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 5, 8, 11
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = labels[1, 0] = labels[1, 4] = -100
    token_weights = torch.rand(B, T, generator=g) + 0.5
    entropy_weights = torch.rand(B, T, generator=g) * 0.3
    want = hand_written(hidden, weight, labels, token_weights, entropy_weights)
    kwargs = dict(token_weights=token_weights, entropy_weights=entropy_weights, shift=True, backend=backend)
    if reduction_path == "single_pass":
        got = sftkey.linear_cross_entropy(hidden, weight, labels, **kwargs)
    else:  # per-token losses, reduced here: the recompute path
        per_token = sftkey.linear_cross_entropy(hidden, weight, labels, reduction="none", **kwargs)
        labelled = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], dim=1) != -100
        got = per_token.sum() / (token_weights.roll(-1, dims=1) * labelled).sum()
    assert abs(float(got) - want) <= 1e-5 * abs(want), (float(got), want)
