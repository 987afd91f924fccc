"""The two autograd Functions over a backend (docs/design.md, "Passes"): the statistics with a
recompute backward, and the single pass for scalar losses. Each takes the differentiable
``x, w, b`` and a plan with the rest; its outputs are a :class:`RowStats`'s tensors in field
order (:func:`outputs`, :func:`stats_of`)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from ..backends.base import Backend, BlockLoss, Head, Needs, Reads, RowStats, StatGrads


@dataclass(frozen=True)
class Recompute:
    """What :class:`StatsFunction` needs besides ``x, w, b`` (:class:`Head`'s other fields)."""

    y: Tensor
    c: Optional[Tensor]
    softcap: Optional[float]
    rows: Optional[Tensor]
    backend: Backend
    filter_eps: Optional[float] = None
    topk: int = 0

    def head(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Head:
        return Head(x, w, b, self.y, self.c, self.softcap, self.rows)


@dataclass(frozen=True)
class SinglePass(Recompute):
    """What :class:`SinglePassFunction` needs besides ``x, w, b``: also the loss block by
    block, which statistics are read, and the caller's grad mode (off: the loss alone)."""

    block_loss: Optional[BlockLoss] = None
    reads: Reads = Reads()
    grad_enabled: bool = True


_FIELDS = tuple(f.name for f in fields(RowStats))
_NOT_DIFFERENTIABLE = ("argmax", "topk")


def outputs(stats: RowStats) -> tuple:
    """``stats`` as a Function's outputs: its tensors in field order, empty for a None."""
    empty = stats.lse.new_empty(0)
    return tuple(empty if t is None else t for _, t in stats.items())


def stats_of(tensors) -> RowStats:
    """The :class:`RowStats` of a Function's outputs (an empty optional statistic back to None)."""
    values = dict(zip(_FIELDS, tensors))
    return RowStats(**{k: None if v.numel() == 0 and k not in _FIELDS[:2] else v for k, v in values.items()})


def _not_differentiable(out: tuple) -> tuple:
    return tuple(t for name, t in zip(_FIELDS, out) if name in _NOT_DIFFERENTIABLE)


def _needs(ctx, b: Optional[Tensor]) -> Needs:
    return Needs(ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])


class StatsFunction(torch.autograd.Function):
    """``(x, w, b) -> RowStats`` (as :func:`outputs`); the backward recomputes the logits and
    takes one upstream gradient per differentiable statistic."""

    @staticmethod
    def forward(ctx, x, w, b, plan: Recompute):
        stats = plan.backend.forward(plan.head(x, w, b), plan.topk)
        ctx.set_materialize_grads(False)  # an unused statistic's gradient arrives as None
        ctx.save_for_backward(x, w, b, stats.lse, stats.expected_logit)
        ctx.plan = plan
        out = outputs(stats)
        ctx.mark_non_differentiable(*_not_differentiable(out))
        return out

    @staticmethod
    def backward(ctx, g_lse, g_zy, g_S, g_Z, _g_argmax, _g_topk):
        x, w, b, lse, S = ctx.saved_tensors
        plan = ctx.plan
        grads = StatGrads(*(None if g is None else g.to(lse.dtype).contiguous() for g in (g_lse, g_zy, g_S, g_Z)))
        dx, dw, db = plan.backend.backward(plan.head(x, w, b), RowStats(lse, None, S), grads, _needs(ctx, b),
                                           plan.filter_eps)
        return dx, dw, db, None


class SinglePassFunction(torch.autograd.Function):
    """``(x, w, b) -> (loss, *RowStats)`` for a scalar loss: the backend forms the gradients
    during the forward from ``plan.block_loss``; the backward only scales them by the
    upstream gradient. The statistics are returned detached (for ``return_stats``)."""

    @staticmethod
    def forward(ctx, x, w, b, plan: SinglePass):
        needs = _needs(ctx, b) if plan.grad_enabled else Needs(False, False, False)
        result = plan.backend.single_pass(plan.head(x, w, b), plan.block_loss, needs, plan.reads, plan.filter_eps)
        ctx.save_for_backward(result.dx, result.dw, result.db)
        out = outputs(result.stats)
        ctx.mark_non_differentiable(*out)
        return (torch.as_tensor(result.loss, dtype=result.stats.lse.dtype, device=x.device), *out)

    @staticmethod
    def backward(ctx, g_loss, *_):
        return (*scaled(ctx.saved_tensors, g_loss), None)


def scaled(grads, g_loss: Tensor) -> tuple:
    """The gradients a single pass formed in its forward, times the upstream gradient of the
    loss (as they are where that is 1 on the CPU: no multiply, no copy)."""
    if g_loss.device.type == "cpu" and float(g_loss) == 1.0:
        return tuple(grads)
    return tuple(None if g is None else g * g_loss.to(g.dtype) for g in grads)
