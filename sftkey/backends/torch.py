"""The torch backend (``backend="torch"``): chunked PyTorch on any device, any dtype, never an
``N x V`` buffer. The group engine (:mod:`.engine`) forms each group's logits products and
their gradient products; this module is the block math between them, and how large a group
and a block are on each device.

**Products.** From bf16/fp16 inputs the logits are float32 where the device has
float32-output products (CUDA: cuBLAS accumulates in float32 and rounds once, to float32;
``dz`` then overlays the chunk in the inputs' dtype for the gradient products, which sum
``dW`` by float32-output ``addmm``), else in the inputs' dtype where the device runs them
natively, else in float32 from float32 copies (:func:`.products.product_dtype`).

**Sizes** (:func:`group_budget`). On a CPU a group's chunk takes the chunk budget
(:func:`sftkey.set_chunk_budget`, 48 MiB), and blocks an eighth of it, sized to stay in
cache. On CUDA a group takes at least the float32 ``dW``'s ``4VD`` bytes where ``dW`` is
formed (each ``dW`` product then sums over at least ``D`` rows, the float32 sum is rewritten
at most ``N / D`` times), at most a sixteenth of the device's free memory, and a block is the
whole group: few large kernels, and with the block buffers at most four chunks.

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
from .engine import (LOWP_DTYPES, NO_GRADS, Backend, BlockLoss, Head, Needs, Operand, Reads, RowStats, SinglePassResult,
                     StatGrads, accumulation_dtype, rows_per_group, rows_within, run, slices)
from .products import float32_output, product_dtype

#: float32 blocks of budget / 8 bytes on a CPU: as fast as larger ones, leaving the budget to the groups
_BLOCK_SHARE = 8
#: The floor of ``z - m`` (and ``z - lse``) before ``exp``, per accumulation dtype: no
#: ``exp`` underflows (torch's CPU ``exp`` below -87 took 15-35x as long, and denormal
#: results slow what follows on many CPUs), while ``V exp(floor)`` stays far below the
#: dtype's rounding of a sum of exponentials that holds ``exp(0) = 1`` (``V e^-50 < 1e-16``
#: for ``V < 2^30``): the floor changes no result of the dtype.
EXP_FLOOR = {torch.float32: -50.0, torch.float64: -700.0}


def group_budget(head: Head, needs: Needs) -> int:
    """Bytes of one group's chunk (module docstring, "Sizes")."""
    budget = config.chunk_budget_bytes
    if not head.x.is_cuda:
        return budget
    return device_budget(budget, head.w.numel() * 4 if needs.dw else 0, torch.cuda.mem_get_info(head.x.device)[0])


def device_budget(budget: int, dw_bytes: int, free_bytes: int) -> int:
    """A CUDA group's chunk bytes: at least ``budget`` and the float32 ``dW``'s ``dw_bytes``, at
    most a sixteenth of the device's ``free_bytes`` (but never below ``budget``)."""
    return max(budget, min(max(budget, dw_bytes), free_bytes // 16))


def operand(head: Head, needs: Needs, logits_dtype: torch.dtype, budget: int, **modes) -> Operand:
    """The engine's :class:`~.engine.Operand` of a one-head pass: groups within ``budget``, all
    rows in one where a bf16/fp16 ``dW`` is formed and they fit within the budget plus its
    float32 sum. ``modes``: the operand's ``float32_output`` and ``float32_sums``."""
    x, V = head.x, head.w.shape[0]
    bonus = head.w.numel() * 4 if needs.dw and x.dtype != accumulation_dtype(x.dtype) else 0
    rows = rows_per_group(head.tokens, V * logits_dtype.itemsize, budget, bonus)
    return Operand(head, needs, rows, logits_dtype, **modes)


class Blocks:
    """The block buffers of one call (module docstring) and the block math on them.
    ``two_buffers``: keep the logits beside ``exp(z - m)`` (needed for ``S`` and its gradient)."""

    def __init__(self, head: Head, op: Operand, two_buffers: bool):
        V = head.w.shape[0]
        acc = op.acc
        self.op = op
        cpu = head.x.device.type == "cpu"
        self.rows = rows_within(config.chunk_budget_bytes // _BLOCK_SHARE, V * 4, op.group_rows) if cpu else op.group_rows
        kw = dict(dtype=acc, device=head.x.device)
        # the logits in a buffer of their own where the chunk is not in ``acc`` or gets an overlaid dz
        self.z = torch.empty(self.rows, V, **kw) if op.out.dtype != acc or op.float32_output else None
        self.p = torch.empty(self.rows, V, **kw) if two_buffers else None
        self.f = None if head.softcap is None else torch.empty(self.rows, V, **kw)
        self.b = op.b
        self.c = None if head.c is None else head.c.to(acc)
        self.softcap = head.softcap
        self.floor = EXP_FLOOR[acc]

    def of(self, group: slice):
        """The blocks of a group, as slices of the head's tokens."""
        return slices(group.start, group.stop, self.rows)

    def logits(self, chunk: Tensor, group: slice, block: slice):
        """A block's logits ``z`` (and ``f`` under softcap) from its rows of the chunk, and
        those rows (a slice of the group)."""
        rows = slice(block.start - group.start, block.stop - group.start)
        o = chunk[rows]
        z = o if self.z is None else self.z[: o.shape[0]].copy_(o)
        if self.b is not None:
            z.add_(self.b)
        f = None
        if self.softcap is not None:
            cap = self.softcap
            z.div_(cap).tanh_()
            f = torch.mul(z, z, out=self.f[: z.shape[0]]).neg_().add_(1)
            z.mul_(cap)
        return z, f, rows

    def exp_shifted(self, z: Tensor, shift: Tensor) -> Tensor:
        """``exp(max(z - shift, floor))`` (:data:`EXP_FLOOR`): into the second buffer, or over
        ``z`` when there is none."""
        out = z.sub_(shift[:, None]) if self.p is None else torch.sub(z, shift[:, None], out=self.p[: z.shape[0]])
        return out.clamp_(min=self.floor).exp_()

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
        x = head.x
        f32_output = x.dtype in LOWP_DTYPES and float32_output(x.device.type, x.dtype)
        op = operand(head, needs, torch.float32 if f32_output else product_dtype(x.device, x.dtype),
                     group_budget(head, needs), float32_output=f32_output, float32_sums=f32_output)
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
                z, f, rows = blocks.logits(chunks[0], group, block)
                p = blocks.exp_shifted(z, stats.lse[block])
                op.keep(group, rows, blocks.dz(head, block, z, p, f, stats.expected_logit[block], grads.select(block)))
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
                z, f, rows = blocks.logits(chunks[0], group, block)
                stats, e, sum_exp = blocks.stats(head, block, z, 0, reads)
                part = block_loss(block, stats)
                losses.append(part.loss)
                if grads:
                    dz = blocks.dz(head, block, z, e, f, stats.expected_logit, part.grads, inv=sum_exp.reciprocal())
                    op.keep(group, rows, dz)
                parts.append(stats)
            return (grads,)

        run([op], work)
        return SinglePassResult(sum(losses), RowStats.cat(parts), *op.result())
