"""The oracle: materializes the logits in float32 (float64 for float64 inputs) and computes
the loss with ``torch.log_softmax``, independently of :mod:`sftkey.loss` and the backends.
Same signatures as :func:`sftkey.linear_cross_entropy` and :func:`sftkey.logit_stats`;
memory is ``O(N V)``, so use it on small shapes."""
from __future__ import annotations

import torch
from torch import Tensor

from .api import LossStats, LogitStats, Prepared, prepare, shape_stats
from .backends.base import Stats


def logits(p: Prepared) -> Tensor:
    """``[N, V]`` logits ``x w^T + b`` in the accumulation dtype, soft-capped."""
    z = p.x.to(p.acc) @ p.w.to(p.acc).t()
    if p.b is not None:
        z = z + p.b.to(p.acc)
    if p.softcap is not None:
        z = p.softcap * torch.tanh(z / p.softcap)
    return z


def linear_cross_entropy(hidden, weight, targets, *, return_stats=False, backend="reference", **options):
    """Materializing :func:`sftkey.linear_cross_entropy` (``backend`` is ignored)."""
    reduction = options.get("reduction", "mean")
    normalizer = options.get("normalizer")
    p = prepare(hidden, weight, targets, **options)
    o = p.opts
    with p.autocast_off():
        z = logits(p)
        logp = torch.log_softmax(z, dim=-1)
        prob = logp.exp()
        valid = p.y >= 0
        y = p.y.clamp_min(0)
        V = z.shape[-1]
        w = torch.ones(V, dtype=z.dtype, device=z.device) if o.class_weights is None else o.class_weights.to(z.dtype)
        nll = -logp.gather(1, y[:, None]).squeeze(1) * w[y]
        smooth = -(logp * w).sum(-1) / V
        ce = (1 - o.label_smoothing) * nll + o.label_smoothing * smooth
        if o.token_weights is not None:
            ce = ce * o.token_weights
        if o.dft:
            ce = ce * prob.gather(1, y[:, None]).squeeze(1).detach()
        lse = torch.logsumexp(z, dim=-1)
        entropy = torch.special.entr(prob).sum(-1)
        loss = ce + o.z_loss * lse ** 2
        if o.entropy_weights is not None:
            loss = loss - o.entropy_weights * entropy
        loss = loss * valid
        if reduction == "none":
            out = loss.reshape(p.shape)
        elif reduction == "sum":
            out = loss.sum()
        else:
            if normalizer is not None:
                denom = torch.as_tensor(normalizer, dtype=loss.dtype, device=loss.device).reshape(())
            else:
                a = torch.ones_like(loss) if o.token_weights is None else o.token_weights
                denom = (a * w[y] * valid).sum()
                denom = torch.where(denom == 0, torch.ones_like(denom), denom)
            out = loss.sum() / denom
    if not return_stats:
        return out
    logp_y = torch.where(valid, logp.gather(1, y[:, None]).squeeze(1), torch.zeros_like(lse)).detach()
    correct = (z.argmax(-1) == p.y) & valid
    stats = LossStats(*(t.reshape(p.shape) for t in (lse.detach(), entropy.detach(), logp_y, correct)))
    return out, stats


def logit_stats(hidden, weight, targets, *, bias=None, class_weights=None, softcap=None,
                ignore_index=-100, topk=0, backend="reference", filter_eps=None) -> LogitStats:
    """Materializing :func:`sftkey.logit_stats` (``backend`` and ``filter_eps`` are ignored)."""
    p = prepare(hidden, weight, targets, bias=bias, class_weights=class_weights, softcap=softcap,
                ignore_index=ignore_index, topk=topk)
    with p.autocast_off():
        z = logits(p)
        valid = p.y >= 0
        lse = torch.logsumexp(z, dim=-1)
        prob = torch.softmax(z, dim=-1)
        zy = z.gather(1, p.y.clamp_min(0)[:, None]).squeeze(1) * valid
        c = torch.ones_like(z[0]) if p.c is None else p.c.to(z.dtype)
        top = z.topk(topk, dim=-1).values.detach() if topk else None
        stats = Stats(lse, zy, (prob * z).sum(-1), z @ c, z.argmax(-1), top)
    return shape_stats(stats, p)
