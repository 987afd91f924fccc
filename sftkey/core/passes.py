"""The passes beneath the API (docs/design.md, "Passes"): which tokens go to the backend, and
through which autograd Function.

* :func:`statistics`: every token's statistics, differentiable, with a backward that
  recomputes the logits (``logit_stats``, ``reduction="none"``, and losses whose weights
  need a gradient).
* :func:`loss`: ``linear_cross_entropy``'s loss. A scalar reduction takes the single pass
  over the tokens that have a loss only (:func:`sftkey.core.loss.contributing`; the others, such
  as SFT's ignored prompt tokens, cost no products); with ``return_stats`` the others get
  their statistics from a forward over their rows alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .autograd import Recompute, SinglePass, SinglePassFunction, StatsFunction, stats_of
from ..backends.base import Backend, BlockResult, Head, Reads, RowStats, StatGrads
from .inputs import Prepared
from .loss import TokenTerms, contributing, denominator, reduce, token_losses


def statistics(p: Prepared, backend: Backend, topk: int = 0) -> RowStats:
    """Every token's statistics, differentiable with respect to ``x``, ``w`` and ``b``."""
    h = p.head
    plan = Recompute(h.y, h.c, h.softcap, h.rows, backend, p.options.filter_eps, topk)
    return stats_of(StatsFunction.apply(h.x, h.w, h.b, plan))


def loss(p: Prepared, backend: Backend) -> tuple:
    """``(loss, stats)``: the loss reduced as ``p.options`` says (float32, or float64 for
    float64 inputs), and every token's statistics where ``return_stats`` is set (else None)."""
    o = p.options
    denom = denominator(p.y, p.terms, o.normalizer, p.acc) if o.reduction == "mean" else None
    weights = (o.token_weights, o.entropy_weights, o.class_weights)
    weight_grads = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in weights)
    with p.autocast_off():
        if o.reduction == "none" or weight_grads:
            stats = statistics(p, backend)
            return reduce(token_losses(stats, p.y, p.terms), o.reduction, denom), stats if o.return_stats else None
        scale = denom if denom is not None else torch.ones((), dtype=p.acc, device=p.y.device)
        return _single_pass(p, backend, scale)


@dataclass(frozen=True)
class TokenBlockLoss:
    """The single pass's :class:`~sftkey.backends.base.BlockLoss` for ``sum_i l_i / scale``:
    the block's loss and, ``with_grads``, its gradients with respect to the statistics."""

    y: Tensor
    terms: TokenTerms
    scale: Tensor
    with_grads: bool

    def __call__(self, block: slice, stats: RowStats) -> BlockResult:
        y, terms = self.y[block], self.terms.select(block)
        if not self.with_grads:
            loss = token_losses(stats, y, terms).sum() / self.scale.to(stats.lse.dtype)
            return BlockResult(loss, StatGrads(None, None, None, None))
        with torch.enable_grad():
            leaves = {name: getattr(stats, name).detach().requires_grad_() for name in StatGrads._fields
                      if getattr(stats, name) is not None}
            loss = token_losses(replace(stats, **leaves), y, terms).sum() / self.scale.to(stats.lse.dtype)
            grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
        return BlockResult(loss.detach(), StatGrads(**{name: grads.get(name) for name in StatGrads._fields}))


def _single_pass(p: Prepared, backend: Backend, scale: Tensor) -> tuple:
    head, y, terms = p.head, p.y, p.terms
    keep = contributing(y, terms)
    skip = 0 < int(keep.sum()) < keep.numel()
    if skip:
        kept = keep.nonzero().squeeze(1)
        head, y, terms = replace(head, rows=kept, y=head.y[kept]), y[kept], terms.select(kept)
    want_stats = p.options.return_stats
    grad = torch.is_grad_enabled()
    plan = SinglePass(head.y, head.c, head.softcap, head.rows, backend, p.options.filter_eps,
                      block_loss=TokenBlockLoss(y, terms, scale, grad),
                      reads=Reads(terms.reads_expected_logit or want_stats, terms.reads_weighted_logit_sum, want_stats),
                      grad_enabled=grad)
    total, *parts = SinglePassFunction.apply(head.x, head.w, head.b, plan)
    if not want_stats:
        return total, None
    stats = stats_of(parts)
    if skip:
        stats = RowStats.interleave(keep, stats, _forward_only(p.head, (~keep).nonzero().squeeze(1), backend))
    return total, stats


def _forward_only(head: Head, rows: Tensor, backend: Backend) -> RowStats:
    """The statistics of some of ``head``'s tokens, without gradients."""
    with torch.no_grad():
        return backend.forward(replace(head, x=head.x.detach(), w=head.w.detach(),
                                       b=None if head.b is None else head.b.detach(), rows=rows, y=head.y[rows]))
