"""The two autograd Functions over a backend: statistics with a recompute backward, and the
single pass for scalar losses (DESIGN.md, "Passes" and "Single pass for scalar reductions")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends.base import Backend, BlockLoss, Head, Needs, StatGrads, Stats


def _needs(ctx, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Needs:
    return Needs(ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])


class StatsFunction(torch.autograd.Function):
    """``(x, w, b) -> (lse, target_logit, expected_logit, weighted_logit_sum, argmax, topk)``;
    the backward takes one upstream gradient per differentiable statistic."""

    @staticmethod
    def forward(ctx, x, w, b, y, c, softcap, topk: int, backend: Backend, filter_eps):
        stats = backend.forward(Head(x, w, b, y, c, softcap), topk)
        ctx.set_materialize_grads(False)  # an unused statistic's gradient arrives as None
        ctx.save_for_backward(x, w, b, y, c, stats.lse, stats.expected_logit)
        ctx.softcap, ctx.backend, ctx.filter_eps = softcap, backend, filter_eps
        top = stats.topk if stats.topk is not None else stats.lse.new_empty(stats.lse.shape[0], 0)
        ctx.mark_non_differentiable(stats.argmax, top)
        return (*stats[:5], top)

    @staticmethod
    def backward(ctx, g_lse, g_zy, g_S, g_Z, _g_argmax, _g_topk):
        x, w, b, y, c, lse, S = ctx.saved_tensors
        head = Head(x, w, b, y, c, ctx.softcap)
        stats = Stats(lse, None, S, None, None)
        grads = StatGrads(*(None if g is None else g.to(lse.dtype).contiguous() for g in (g_lse, g_zy, g_S, g_Z)))
        dx, dw, db = ctx.backend.backward(head, stats, grads, _needs(ctx, x, w, b), ctx.filter_eps)
        return dx, dw, db, None, None, None, None, None, None


class SinglePassFunction(torch.autograd.Function):
    """``(x, w, b) -> (loss, *stats)`` for a scalar loss: the backend forms the gradients
    during the forward from ``block_loss``; the backward only scales them by ``grad_output``.
    The statistics are returned detached (for ``return_stats``). ``wanted``: whether
    ``expected_logit``, ``weighted_logit_sum`` and ``argmax`` are read; ``grad_enabled``: the
    caller's grad mode (off: the loss alone, no gradients formed); ``rows``: the rows of ``x``
    that ``y`` refers to (None: all)."""

    @staticmethod
    def forward(ctx, x, w, b, y, c, softcap, topk: int, backend: Backend, filter_eps,
                block_loss: BlockLoss, wanted: tuple, grad_enabled: bool, rows: Optional[Tensor]):
        head = Head(x, w, b, y, c, softcap)
        needs = _needs(ctx, x, w, b) if grad_enabled else Needs(False, False, False)
        loss, stats, dx, dw, db = backend.single_pass(
            head, block_loss, needs, topk, filter_eps,
            expected_logit=wanted[0], weighted_logit_sum=wanted[1], argmax=wanted[2], rows=rows)
        ctx.save_for_backward(dx, dw, db)
        empty = stats.lse.new_empty(0)
        outputs = tuple(empty if t is None else t for t in (*stats[:5], stats.topk))
        ctx.mark_non_differentiable(*outputs)
        return (torch.as_tensor(loss, dtype=stats.lse.dtype, device=x.device), *outputs)

    @staticmethod
    def backward(ctx, g_loss, *_):
        if g_loss.device.type == "cpu" and float(g_loss) == 1.0:
            return (*ctx.saved_tensors, *_NO_GRADS)
        grads = (None if g is None else g * g_loss.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, *_NO_GRADS)


_NO_GRADS = (None,) * 10  # y, c, softcap, topk, backend, filter_eps, block_loss, wanted, grad_enabled, rows
