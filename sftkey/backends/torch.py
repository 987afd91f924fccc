"""Chunked pure-PyTorch backend: any device, any dtype, never an N x V buffer.

Rows go in *groups* of ``R`` rows, whose logits products land in one buffer that fits
:data:`sftkey.config.chunk_budget_bytes`; each group is worked through in *blocks* of
``r <= R`` rows for the elementwise math in the accumulation dtype ``A`` (float64 for
float64 inputs, else float32). The products take the inputs' dtype, or float32 from
bf16/fp16 inputs where the device has no native low-precision product
(:mod:`.products`). The buffers are reused for every group:

* ``out`` ``[R, V]`` products' dtype: logits products, then ``dz`` for the gradient products;
* ``z``   ``[r, V]`` A: a block's logits (soft-capped), later ``dz`` (native bf16/fp16
  products only; otherwise a block works on its rows of ``out`` directly); ``r`` rows fill
  an eighth of the budget;
* ``p``   ``[r, V]`` A: ``exp(z - m)`` beside the logits, only where ``S`` or its gradient
  is needed (else the exponential overwrites the logits);
* ``f``   ``[r, V]`` A (softcap only): ``1 - (z / cap)^2``;
* ``x32`` ``[R, D]`` and ``w32`` (a slice of W's rows), float32: the up-cast operands of
  float32 products from bf16/fp16 inputs.

The gradient products run once per group, so the float32 ``dW`` (one buffer of W's size for
a bf16/fp16 W, none for float32, where ``addmm_`` adds in place) is read and written
``N / R`` times; a native bf16/fp16 product of a vocabulary slice goes through a staging
pair sized to stay in cache. Where all rows fit in one group within the budget plus that
buffer's ``4VD`` bytes, they make one group instead: its ``dW`` is a single product (summed
in float32 inside the matrix product), so the buffer is not needed and the products are as
large as they can be. The math of ``dz`` is docs/design.md's: the one-hot term is a scatter, the
class-weight term an in-place rank-one update of the block.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import config
from .base import Backend, BlockLoss, Head, Needs, Reads, RowStats, SinglePassResult, StatGrads, accumulation_dtype
from . import products
from .products import product_dtype

_ROW_ALIGN = 16
_BLOCK_SHARE = 8  # float32 blocks of budget / 8 bytes: as fast as larger ones, leaving the budget to the groups
_STAGING_BYTES = 2 << 20  # float32 staging of one dW slice: stays in cache, keeps the products large
_UPCAST_BYTES = 4 << 20  # float32 slices of a bf16/fp16 W where its products are formed in float32


def _rows(budget: int, bytes_per_row: int, n: int) -> int:
    """Rows of ``bytes_per_row`` that fit ``budget``: a multiple of 16 (at least 16), at most ``n``."""
    return min(n, max(_ROW_ALIGN, budget // bytes_per_row // _ROW_ALIGN * _ROW_ALIGN))


class _Workspace:
    """The buffers of one call, sized once and reused for every group and block of rows.
    ``two_buffers``: keep the logits beside ``exp(z - m)`` (needed for ``S`` and its gradient);
    ``dw``: a bf16/fp16 ``dW`` is formed, so one group may use the float32 buffer's memory.
    The head's ``rows`` (the rows of ``x`` that are its tokens) are gathered group by group.
    A *group* and a *block* are slices of the head's tokens.

    The products are formed in ``product_dtype`` (:mod:`.products`): the inputs' dtype, or
    float32 from bf16/fp16 inputs where their products are not native (``upcast``); then
    ``out`` is float32, the hidden states of a group are up-cast into ``x32`` and ``W`` slice by
    slice into ``w32``.

    ``out_dtype`` given (the Triton single pass): ``out`` takes that dtype, the products are
    the caller's and no float32 blocks are allocated (the caller's kernels do the block math);
    ``budget`` then replaces :data:`sftkey.config.chunk_budget_bytes`."""

    def __init__(self, head: Head, two_buffers: bool, dw: bool = False, out_dtype: Optional[torch.dtype] = None,
                 budget: Optional[int] = None):
        x, w = head.x, head.w
        n, (V, D) = head.y.shape[0], w.shape
        self.acc = accumulation_dtype(x.dtype)
        blocks = out_dtype is None
        self.upcast = blocks and product_dtype(x.device, x.dtype) != x.dtype
        if blocks:
            out_dtype = self.acc if self.upcast else x.dtype
        out_size = out_dtype.itemsize
        budget = budget or config.chunk_budget_bytes
        one_group = dw and x.dtype != self.acc and n * V * out_size <= budget + w.numel() * 4
        self.group_rows = n if one_group else _rows(budget, V * out_size, n)
        self.block_rows = _rows(budget // _BLOCK_SHARE, V * 4, self.group_rows)
        kw = dict(dtype=self.acc, device=x.device)
        self.out = torch.empty(self.group_rows, V, dtype=out_dtype, device=x.device)
        self.z = torch.empty(self.block_rows, V, **kw) if blocks and out_dtype != self.acc else None
        self.p = torch.empty(self.block_rows, V, **kw) if blocks and two_buffers else None
        self.f = None if not blocks or head.softcap is None else torch.empty(self.block_rows, V, **kw)
        self.b = None if head.b is None else head.b.to(self.acc)
        self.c = None if head.c is None else head.c.to(self.acc)
        self.softcap = head.softcap
        self.rows = head.rows
        self.xg = None if head.rows is None else x.new_empty(self.group_rows, D)
        if self.upcast:
            self.x32 = torch.empty(self.group_rows, D, **kw)
            self.w32 = torch.empty(min(V, max(_ROW_ALIGN, _UPCAST_BYTES // (D * 4))), D, **kw)

    def groups(self, n: int):
        for start in range(0, n, self.group_rows):
            yield slice(start, min(start + self.group_rows, n))

    def hidden(self, head: Head, group: slice) -> Tensor:
        """The hidden states of a group's tokens: a view of ``x``, or gathered from its ``rows``."""
        if self.rows is None:
            return head.x[group]
        return torch.index_select(head.x, 0, self.rows[group], out=self.xg[: group.stop - group.start])

    def blocks(self, group: slice):
        for start in range(group.start, group.stop, self.block_rows):
            yield slice(start, min(start + self.block_rows, group.stop))

    def products(self, head: Head, group: slice) -> Tensor:
        """The logits products of a group of rows, into ``out``; returns the group's hidden
        states (up-cast to float32 where the products are)."""
        x = self.hidden(head, group)
        out = self.out[: group.stop - group.start]
        if not self.upcast:
            products.LOGITS(x, head.w.t(), out)
            return x
        x = self.x32[: out.shape[0]].copy_(x)
        for cols, w in self.weight_slices(head.w):
            torch.mm(x, w.t(), out=out[:, cols])
        return x

    def weight_slices(self, w: Tensor):
        """``(cols, W[cols] in float32)`` for consecutive slices of W's rows, through ``w32``."""
        step = self.w32.shape[0]
        for start in range(0, w.shape[0], step):
            cols = slice(start, min(start + step, w.shape[0]))
            yield cols, self.w32[: cols.stop - cols.start].copy_(w[cols])

    def logits(self, group: slice, block: slice):
        """A block's logits ``z`` (and ``f`` under softcap) from its rows ``o`` of ``out``."""
        o = self.out[block.start - group.start: block.stop - group.start]
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


class _Gradients:
    """``dX``, ``dW`` and ``db`` from each group's ``dz``; sums across groups in float32.

    ``dW`` of a float32 W, or of a single group with native products, is the products
    themselves (``addmm_`` adds in place; one product sums in float32 inside the matrix
    product). A bf16/fp16 W over several groups sums in a float32 buffer of W's size: with
    float32 products (``ws.upcast``) by ``addmm_`` into it, with native ones slice by slice
    through a staging pair sized to stay in cache, the last group writing the slice's sum in
    W's dtype while it is there. Float32 products of a single group go to W's dtype through
    the float32 staging slice."""

    def __init__(self, head: Head, needs: Needs, ws: _Workspace):
        x, w = head.x, head.w
        (V, D), several = w.shape, head.y.shape[0] > ws.group_rows
        self.head, self.ws = head, ws
        self.dx = None
        if needs.dx:  # rows not in ws.rows keep a zero gradient; the others go through dx_part
            self.dx = torch.empty_like(x) if ws.rows is None else torch.zeros_like(x)
            self.dx_part = None if ws.rows is None else x.new_empty(ws.group_rows, D)
            self.dx32 = torch.empty(ws.group_rows, D, dtype=ws.acc, device=x.device) if ws.upcast else None
        self.db = torch.zeros(V, dtype=ws.acc, device=w.device) if needs.db and head.b is not None else None
        self.dw = torch.empty_like(w) if needs.dw else None
        self.sum = self.stage = self.stage_lo = None
        self.first = True
        if self.dw is not None and w.dtype != ws.acc:
            if several:
                self.sum = torch.empty(w.shape, dtype=ws.acc, device=w.device)
            if several != ws.upcast:  # native products of several groups, or float32 ones of one
                self.v_slice = max(_ROW_ALIGN, _STAGING_BYTES // (D * 4))
                rows = min(self.v_slice, V)
                self.stage = torch.empty(rows, D, dtype=ws.acc, device=w.device)
                if not ws.upcast:
                    self.stage_lo = torch.empty(rows, D, dtype=w.dtype, device=w.device)

    def add(self, group: slice, dz: Tensor, x: Tensor) -> None:
        """Add the products of a group's ``dz`` (its rows of ``out``) and hidden states ``x``
        (both in the products' dtype)."""
        head, rows = self.head, self.ws.rows
        if self.db is not None:
            self.db.add_(dz.sum(dim=0, dtype=self.db.dtype))
        if self.dx is not None:
            part = self.dx[group] if rows is None else self.dx_part[: group.stop - group.start]
            if self.dx32 is not None:
                self._dx_upcast(dz, part)
            else:
                products.DX(dz, head.w, part)
            if rows is not None:
                self.dx.index_copy_(0, rows[group], part)
        if self.dw is None:
            return
        last = group.stop == head.y.shape[0]
        if self.stage is not None:
            self._add_staged(dz, x, last)
        else:
            total = self.dw if self.sum is None else self.sum
            products.DW(dz.t(), x, total, accumulate=not self.first)
            if last and self.sum is not None:
                self.dw.copy_(self.sum)
        self.first = False

    def _dx_upcast(self, dz: Tensor, part: Tensor) -> None:
        """A group's ``dX = dz W`` in float32, over the float32 slices of W, into ``part``."""
        total = self.dx32[: dz.shape[0]]
        for i, (cols, w) in enumerate(self.ws.weight_slices(self.head.w)):
            if i == 0:
                torch.mm(dz[:, cols], w, out=total)
            else:
                total.addmm_(dz[:, cols], w)
        part.copy_(total)

    def _add_staged(self, dz: Tensor, x: Tensor, last: bool) -> None:
        """A group's bf16/fp16 ``dW`` slice by slice: native products through the staging pair
        into the float32 sums, or a single group's float32 products to W's dtype."""
        V = dz.shape[1]
        stage = self.stage if self.stage_lo is None else self.stage_lo
        for v in range(0, V, self.v_slice):
            cols = slice(v, min(v + self.v_slice, V))
            k = cols.stop - cols.start
            part = stage[:k]
            products.DW(dz[:, cols].t(), x, part)
            if self.sum is None:
                self.dw[cols].copy_(part)
            elif self.first:
                self.sum[cols].copy_(part)
            elif last:
                self.dw[cols].copy_(self.stage[:k].copy_(part).add_(self.sum[cols]))
            else:
                self.sum[cols].add_(self.stage[:k].copy_(part))

    def result(self):
        db = None if self.db is None else self.db.to(self.head.b.dtype)
        return self.dx, self.dw, db


def _keep(o: Tensor, dz: Tensor) -> None:
    """Leave a block's ``dz`` in its rows ``o`` of ``out`` (in the input dtype)."""
    if dz.data_ptr() != o.data_ptr():
        o.copy_(dz)


class TorchBackend(Backend):
    """Chunked PyTorch: forward, recompute backward, and a single pass for scalar losses."""

    name = "torch"

    def forward(self, head: Head, topk: int = 0) -> RowStats:
        ws = _Workspace(head, two_buffers=True)
        parts = []
        for group in ws.groups(head.y.shape[0]):
            ws.products(head, group)
            for block in ws.blocks(group):
                z, _, _ = ws.logits(group, block)
                parts.append(ws.stats(head, block, z, topk)[0])
        return RowStats.cat(parts)

    def backward(self, head: Head, stats: RowStats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None):
        ws = _Workspace(head, two_buffers=grads.expected_logit is not None, dw=needs.dw)
        out = _Gradients(head, needs, ws)
        for group in ws.groups(head.y.shape[0]):
            x = ws.products(head, group)
            for block in ws.blocks(group):
                z, f, o = ws.logits(group, block)
                p = ws.exp_shifted(z, stats.lse[block])
                g = StatGrads(*(None if t is None else t[block] for t in grads))
                _keep(o, ws.dz(head, block, z, p, f, stats.expected_logit[block], g))
            out.add(group, ws.out[: group.stop - group.start], x)
        return out.result()

    def single_pass(self, head: Head, block_loss: BlockLoss, needs: Needs, reads: Reads = Reads(),
                    filter_eps: Optional[float] = None) -> SinglePassResult:
        ws = _Workspace(head, two_buffers=reads.expected_logit, dw=needs.dw)
        out = _Gradients(head, needs, ws)
        parts, loss = [], 0
        for group in ws.groups(head.y.shape[0]):
            x = ws.products(head, group)
            for block in ws.blocks(group):
                z, f, o = ws.logits(group, block)
                stats, e, sum_exp = ws.stats(head, block, z, 0, reads)
                part = block_loss(block, stats)
                loss = loss + part.loss
                if any(needs):
                    _keep(o, ws.dz(head, block, z, e, f, stats.expected_logit, part.grads, inv=sum_exp.reciprocal()))
                parts.append(stats)
            if any(needs):
                out.add(group, ws.out[: group.stop - group.start], x)
        return SinglePassResult(loss, RowStats.cat(parts), *out.result())
