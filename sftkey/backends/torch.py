"""The torch backend (``backend="torch"``): chunked PyTorch on any device, any dtype, never an
``N x V`` buffer. The group engine (:mod:`.engine`) forms each group's logits products (in the
inputs' dtype, or float32 from bf16/fp16 inputs where the device has no native product:
:mod:`.products`) and their gradient products; this module is the block math between them.

Each group is worked through in *blocks* of ``r`` rows in the accumulation dtype ``A``
(float64 for float64 inputs, else float32), in buffers reused for every block:

* ``z`` ``[r, V]`` A: a block's logits (soft-capped), later its ``dz`` (where the chunk is not
  in ``A`` already; otherwise a block works on its rows of the chunk directly); ``r`` rows
  fill an eighth of the chunk budget;
* ``p`` ``[r, V]`` A: ``exp(z - m)`` beside the logits, only where ``S`` or its gradient is
  needed (else the exponential overwrites the logits);
* ``f`` ``[r, V]`` A (soft-cap only): ``1 - (z / cap)^2``.

The math of ``dz`` is docs/design.md's: the one-hot term is a scatter, the class-weight term
an in-place rank-one update of the block. Where all rows fit one group within the budget plus
a bf16/fp16 ``dW``'s float32 sum (``4VD`` bytes), they make one group: its ``dW`` is a single
product, and the sum is not needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import config
from .engine import (NO_GRADS, Backend, BlockLoss, Head, Needs, Operand, Reads, RowStats, SinglePassResult, StatGrads,
                     accumulation_dtype, keep, rows_per_group, rows_within, run, slices)
from .products import product_dtype

#: float32 blocks of budget / 8 bytes: as fast as larger ones, leaving the budget to the groups
_BLOCK_SHARE = 8


def operand(head: Head, needs: Needs, logits_dtype: torch.dtype, budget: int, **products) -> Operand:
    """The engine's :class:`~.engine.Operand` of a one-head pass: groups within ``budget``, all
    rows in one where a bf16/fp16 ``dW`` is formed and they fit within the budget plus its
    float32 sum. ``products``: the operand's ``float32_output`` and ``float32_sums``."""
    x, V = head.x, head.w.shape[0]
    bonus = head.w.numel() * 4 if needs.dw and x.dtype != accumulation_dtype(x.dtype) else 0
    rows = rows_per_group(head.tokens, V * logits_dtype.itemsize, budget, bonus)
    return Operand(head, needs, rows, logits_dtype, **products)


class Blocks:
    """The block buffers of one call (module docstring) and the block math on them.
    ``two_buffers``: keep the logits beside ``exp(z - m)`` (needed for ``S`` and its gradient)."""

    def __init__(self, head: Head, op: Operand, two_buffers: bool):
        V = head.w.shape[0]
        acc = op.acc
        self.rows = rows_within(config.chunk_budget_bytes // _BLOCK_SHARE, V * 4, op.group_rows)
        kw = dict(dtype=acc, device=head.x.device)
        self.z = torch.empty(self.rows, V, **kw) if op.out.dtype != acc else None
        self.p = torch.empty(self.rows, V, **kw) if two_buffers else None
        self.f = None if head.softcap is None else torch.empty(self.rows, V, **kw)
        self.b = op.b
        self.c = None if head.c is None else head.c.to(acc)
        self.softcap = head.softcap

    def of(self, group: slice):
        """The blocks of a group, as slices of the head's tokens."""
        return slices(group.start, group.stop, self.rows)

    def logits(self, chunk: Tensor, group: slice, block: slice):
        """A block's logits ``z`` (and ``f`` under softcap) from its rows ``o`` of the chunk."""
        o = chunk[block.start - group.start: block.stop - group.start]
        z = o if self.z is None else self.z[: o.shape[0]].copy_(o)
        if self.b is not None:
            z.add_(self.b)
        f = None
        if self.softcap is not None:
            cap = self.softcap
            z.div_(cap).tanh_()
            f = torch.mul(z, z, out=self.f[: z.shape[0]]).neg_().add_(1)
            z.mul_(cap)
        return z, f, o

    def exp_shifted(self, z: Tensor, shift: Tensor) -> Tensor:
        """``exp(z - shift)``: into the second buffer, or over ``z`` when there is none."""
        if self.p is None:
            return z.sub_(shift[:, None]).exp_()
        return torch.sub(z, shift[:, None], out=self.p[: z.shape[0]]).exp_()

    def stats(self, head: Head, block: slice, z: Tensor, topk: int, reads: Reads = Reads()):
        """Statistics of a block's logits (``S``, ``Z``, ``argmax`` None where not read: the
        max alone is a third of the cost of the max with its index). Returns ``(stats, e,
        sum_exp)`` with ``e = exp(z - m)``, which overwrites ``z`` where there is no second buffer."""
        y = head.y[block]
        m, argmax = z.max(dim=1) if reads.argmax else (z.amax(dim=1), None)
        zy = z.gather(1, y.clamp_min(0)[:, None]).view(-1) * (y >= 0)
        Z = None
        if reads.weighted_logit_sum:
            Z = z.sum(dim=1) if self.c is None else z @ self.c
        top = z.topk(topk, dim=1).values if topk else None
        e = self.exp_shifted(z, m)
        sum_exp = e.sum(dim=1)
        S = torch.linalg.vecdot(e, z) / sum_exp if reads.expected_logit else None  # 6x faster than bmm here
        return RowStats(m + sum_exp.log(), zy, S, Z, argmax, top), e, sum_exp

    def dz(self, head: Head, block: slice, z: Tensor, e: Tensor, f: Optional[Tensor],
           S: Optional[Tensor], grads: StatGrads, inv: Optional[Tensor] = None) -> Tensor:
        """``dz`` of a block (docs/design.md) in place of ``z`` or ``e``, where ``p = e * inv``
        (``inv`` None: ``e`` is ``p``)."""
        g_lse, g_zy, g_S, g_Z = grads
        k_lse, k_S = (g if g is None or inv is None else g * inv for g in (g_lse, g_S))
        if k_S is not None:
            z.sub_((S - 1)[:, None]).mul_(k_S[:, None])
            if k_lse is not None:
                z.add_(k_lse[:, None])
            dz = z.mul_(e)
        elif k_lse is not None:
            dz = e.mul_(k_lse[:, None])
        else:
            dz = e.zero_()
        if g_Z is not None:
            if self.c is None:
                dz.add_(g_Z[:, None])
            else:
                dz.addr_(g_Z, self.c)
        if g_zy is not None:
            y = head.y[block]
            dz.scatter_add_(1, y.clamp_min(0)[:, None], (g_zy * (y >= 0))[:, None])
        if f is not None:
            dz.mul_(f)
        return dz


class TorchBackend(Backend):
    """Chunked PyTorch: forward, recompute backward, and a single pass for scalar losses."""

    name = "torch"

    def _setup(self, head: Head, needs: Needs, two_buffers: bool):
        op = operand(head, needs, product_dtype(head.x.device, head.x.dtype), config.chunk_budget_bytes)
        return op, Blocks(head, op, two_buffers)

    def forward(self, head: Head, topk: int = 0) -> RowStats:
        op, blocks = self._setup(head, NO_GRADS, two_buffers=True)
        parts = []

        def work(group: slice, chunks: list) -> tuple:
            for block in blocks.of(group):
                z, _, _ = blocks.logits(chunks[0], group, block)
                parts.append(blocks.stats(head, block, z, topk)[0])
            return (False,)

        run([op], work)
        return RowStats.cat(parts)

    def backward(self, head: Head, stats: RowStats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None) -> tuple:
        op, blocks = self._setup(head, needs, two_buffers=grads.expected_logit is not None)

        def work(group: slice, chunks: list) -> tuple:
            for block in blocks.of(group):
                z, f, o = blocks.logits(chunks[0], group, block)
                p = blocks.exp_shifted(z, stats.lse[block])
                keep(o, blocks.dz(head, block, z, p, f, stats.expected_logit[block], grads.select(block)))
            return (True,)

        run([op], work)
        return op.result()

    def single_pass(self, head: Head, block_loss: BlockLoss, needs: Needs, reads: Reads = Reads(),
                    filter_eps: Optional[float] = None) -> SinglePassResult:
        op, blocks = self._setup(head, needs, two_buffers=reads.expected_logit)
        parts, losses = [], []
        grads = any(needs)

        def work(group: slice, chunks: list) -> tuple:
            for block in blocks.of(group):
                z, f, o = blocks.logits(chunks[0], group, block)
                stats, e, sum_exp = blocks.stats(head, block, z, 0, reads)
                part = block_loss(block, stats)
                losses.append(part.loss)
                if grads:
                    keep(o, blocks.dz(head, block, z, e, f, stats.expected_logit, part.grads, inv=sum_exp.reciprocal()))
                parts.append(stats)
            return (grads,)

        run([op], work)
        return SinglePassResult(sum(losses), RowStats.cat(parts), *op.result())
