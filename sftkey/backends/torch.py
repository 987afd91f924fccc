"""Chunked pure-PyTorch backend: any device, any dtype, never an N x V buffer.

Rows go in *groups* of ``R`` rows, whose logits products land in one buffer of the input
dtype that fits :data:`sftkey.config.chunk_budget_bytes`; each group is worked through in
*blocks* of ``r <= R`` rows for the elementwise math in the accumulation dtype ``A``
(float64 for float64 inputs, else float32). The buffers are reused for every group:

* ``out`` ``[R, V]`` input dtype: logits products, then ``dz`` for the gradient products;
* ``z``   ``[r, V]`` A: a block's logits (soft-capped), later ``dz`` (bf16/fp16 inputs only;
  for float32/float64 a block works on its rows of ``out`` directly); ``r`` rows fill an
  eighth of the budget;
* ``p``   ``[r, V]`` A: ``exp(z - m)`` beside the logits, only where ``S`` or its gradient
  is needed (else the exponential overwrites the logits);
* ``f``   ``[r, V]`` A (softcap only): ``1 - (z / cap)^2``.

The gradient products run once per group, so the float32 ``dW`` (one buffer of W's size for
a bf16/fp16 W, none for float32, where ``addmm_`` adds in place) is read and written
``N / R`` times; a bf16/fp16 product of a vocabulary slice goes through a staging pair sized
to stay in cache. Where all rows fit in one group within the budget plus that buffer's
``4VD`` bytes, they make one group instead: its ``dW`` is a single product (summed in float32
inside the matrix product), so the buffer is not needed and the products are as large as
they can be. The math of ``dz`` is DESIGN.md's: the one-hot term is a scatter, the
class-weight term an in-place rank-one update of the block.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import config
from .base import Backend, BlockLoss, Head, Needs, StatGrads, Stats, accumulation_dtype

_ROW_ALIGN = 16
_BLOCK_SHARE = 8  # float32 blocks of budget / 8 bytes: as fast as larger ones, leaving the budget to the groups
_MM_ALIGN = 64  # oneDNN runs a product of 1843 rows ~10% slower than one of 1792 and one of 51
#: From this hidden size, ``dX`` is the product ``(W^T dz^T)^T``: oneDNN runs it 5-60% faster
#: than ``dz W`` at D=4096 (V=32000, 128256), 2-5% slower at D=1024-2304 (bf16 on the build
#: machine's CPU; float32 about even).
_DX_TRANSPOSED_FROM = 4096
_STAGING_BYTES = 2 << 20  # float32 staging of one dW slice: stays in cache, keeps the products large


def _rows(budget: int, bytes_per_row: int, n: int) -> int:
    """Rows of ``bytes_per_row`` that fit ``budget``: a multiple of 16 (at least 16), at most ``n``."""
    return min(n, max(_ROW_ALIGN, budget // bytes_per_row // _ROW_ALIGN * _ROW_ALIGN))


def _mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``a @ b`` into ``out``, the rows split at a multiple of 64 where their count is not one."""
    cut = a.shape[0] // _MM_ALIGN * _MM_ALIGN
    if cut in (0, a.shape[0]):
        torch.mm(a, b, out=out)
        return
    torch.mm(a[:cut], b, out=out[:cut])
    torch.mm(a[cut:], b, out=out[cut:])


class _Workspace:
    """The buffers of one call, sized once and reused for every group and block of rows.
    ``two_buffers``: keep the logits beside ``exp(z - m)`` (needed for ``S`` and its gradient);
    ``dw``: a bf16/fp16 ``dW`` is formed, so one group may use the float32 buffer's memory;
    ``rows``: the rows of ``x`` the targets refer to (None: all), gathered group by group."""

    def __init__(self, head: Head, two_buffers: bool, dw: bool = False, rows: Optional[Tensor] = None):
        x, w = head.x, head.w
        n, V = head.y.shape[0], w.shape[0]
        self.acc = accumulation_dtype(x.dtype)
        self.lowp = x.dtype != self.acc
        budget = config.chunk_budget_bytes
        one_group = dw and self.lowp and n * V * x.element_size() <= budget + w.numel() * 4
        self.group_rows = n if one_group else _rows(budget, V * x.element_size(), n)
        self.block_rows = _rows(budget // _BLOCK_SHARE, V * 4, self.group_rows)
        kw = dict(dtype=self.acc, device=x.device)
        self.out = torch.empty(self.group_rows, V, dtype=x.dtype, device=x.device)
        self.z = torch.empty(self.block_rows, V, **kw) if self.lowp else None
        self.p = torch.empty(self.block_rows, V, **kw) if two_buffers else None
        self.f = None if head.softcap is None else torch.empty(self.block_rows, V, **kw)
        self.b = None if head.b is None else head.b.to(self.acc)
        self.c = None if head.c is None else head.c.to(self.acc)
        self.softcap = head.softcap
        self.rows = rows
        self.xg = None if rows is None else x.new_empty(self.group_rows, x.shape[1])

    def groups(self, n: int):
        for start in range(0, n, self.group_rows):
            yield slice(start, min(start + self.group_rows, n))

    def hidden(self, head: Head, group: slice) -> Tensor:
        """The hidden states of a group's rows: a view of ``x``, or gathered from ``rows``."""
        if self.rows is None:
            return head.x[group]
        return torch.index_select(head.x, 0, self.rows[group], out=self.xg[: group.stop - group.start])

    def blocks(self, group: slice):
        for start in range(group.start, group.stop, self.block_rows):
            yield slice(start, min(start + self.block_rows, group.stop))

    def products(self, head: Head, group: slice) -> Tensor:
        """The logits products of a group of rows, into ``out``; returns the group's hidden states."""
        x = self.hidden(head, group)
        _mm(x, head.w.t(), self.out[: group.stop - group.start])
        return x

    def logits(self, group: slice, rows: slice):
        """A block's logits ``z`` (and ``f`` under softcap) from its rows ``o`` of ``out``."""
        o = self.out[rows.start - group.start: rows.stop - group.start]
        z = self.z[: o.shape[0]].copy_(o) if self.lowp else o
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

    def stats(self, head: Head, rows: slice, z: Tensor, topk: int, want_s: bool, want_z: bool,
              want_argmax: bool = True):
        """Statistics of a block's logits (``S``, ``Z``, ``argmax`` None where not wanted: the
        max alone is a third of the cost of the max with its index). Returns ``(stats, e,
        sum_exp)`` with ``e = exp(z - m)``, which overwrites ``z`` where there is no second buffer."""
        y = head.y[rows]
        m, argmax = z.max(dim=1) if want_argmax else (z.amax(dim=1), None)
        zy = z.gather(1, y.clamp_min(0)[:, None]).view(-1) * (y >= 0)
        Z = None
        if want_z:
            Z = z.sum(dim=1) if self.c is None else z @ self.c
        top = z.topk(topk, dim=1).values if topk else None
        e = self.exp_shifted(z, m)
        sum_exp = e.sum(dim=1)
        S = torch.linalg.vecdot(e, z) / sum_exp if want_s else None  # 6x faster than bmm here
        return Stats(m + sum_exp.log(), zy, S, Z, argmax, top), e, sum_exp

    def dz(self, head: Head, rows: slice, z: Tensor, e: Tensor, f: Optional[Tensor],
           S: Optional[Tensor], grads: StatGrads, inv: Optional[Tensor] = None) -> Tensor:
        """``dz`` of a block (DESIGN.md) in place of ``z`` or ``e``, where ``p = e * inv``
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
            y = head.y[rows]
            dz.scatter_add_(1, y.clamp_min(0)[:, None], (g_zy * (y >= 0))[:, None])
        if f is not None:
            dz.mul_(f)
        return dz


class _Gradients:
    """``dX``, ``dW`` and ``db`` from each group's ``dz``; sums across groups in float32.

    ``dW`` of a float32 W, or of a single group, is the products themselves (``addmm_`` adds
    in place). A bf16/fp16 W over several groups sums in a float32 buffer of W's size: each
    vocabulary slice's product goes through a staging pair sized to stay in cache, and the
    last group writes the slice's sum in W's dtype while it is there."""

    def __init__(self, head: Head, needs: Needs, ws: _Workspace):
        x, w = head.x, head.w
        self.head, self.ws = head, ws
        self.dx = None
        if needs.dx:  # rows not in ws.rows keep a zero gradient; the others go through dx_part
            self.dx = torch.empty_like(x) if ws.rows is None else torch.zeros_like(x)
            self.dx_part = None if ws.rows is None else x.new_empty(ws.group_rows, x.shape[1])
        self.db = torch.zeros(w.shape[0], dtype=ws.acc, device=w.device) if needs.db and head.b is not None else None
        self.dw = torch.empty_like(w) if needs.dw else None
        self.sum = None
        self.first = True
        if self.dw is not None and ws.lowp and head.y.shape[0] > ws.group_rows:
            self.v_slice = max(_ROW_ALIGN, _STAGING_BYTES // (w.shape[1] * 4))
            rows = min(self.v_slice, w.shape[0])
            self.sum = torch.empty(w.shape, dtype=ws.acc, device=w.device)
            self.stage_lo = torch.empty(rows, w.shape[1], dtype=w.dtype, device=w.device)
            self.stage = torch.empty(rows, w.shape[1], dtype=ws.acc, device=w.device)

    def add(self, group: slice, dz: Tensor, x: Tensor) -> None:
        """Add the products of a group's ``dz`` (its rows of ``out``, input dtype) and hidden states ``x``."""
        head, rows = self.head, self.ws.rows
        if self.db is not None:
            self.db.add_(dz.sum(dim=0, dtype=self.db.dtype))
        if self.dx is not None:
            part = self.dx[group] if rows is None else self.dx_part[: group.stop - group.start]
            if head.w.shape[1] >= _DX_TRANSPOSED_FROM:
                part.copy_(torch.mm(head.w.t(), dz.t()).t())
            else:
                _mm(dz, head.w, part)
            if rows is not None:
                self.dx.index_copy_(0, rows[group], part)
        if self.dw is None:
            return
        if self.sum is None:  # float32 W, or a single group: the products are dW itself
            if self.first:
                torch.mm(dz.t(), x, out=self.dw)
            else:
                self.dw.addmm_(dz.t(), x)
        else:
            self._add_staged(dz, x, last=group.stop == head.y.shape[0])
        self.first = False

    def _add_staged(self, dz: Tensor, x: Tensor, last: bool) -> None:
        """A bf16/fp16 group's ``dW`` products, slice by slice through the staging pair."""
        V = dz.shape[1]
        for v in range(0, V, self.v_slice):
            cols = slice(v, min(v + self.v_slice, V))
            k = cols.stop - cols.start
            part = torch.mm(dz[:, cols].t(), x, out=self.stage_lo[:k])
            if self.first:
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

    def forward(self, head: Head, topk: int = 0) -> Stats:
        ws = _Workspace(head, two_buffers=True)
        parts = []
        for group in ws.groups(head.y.shape[0]):
            ws.products(head, group)
            for rows in ws.blocks(group):
                z, _, _ = ws.logits(group, rows)
                parts.append(ws.stats(head, rows, z, topk, want_s=True, want_z=True)[0])
        return _concat(parts)

    def backward(self, head: Head, stats: Stats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None):
        ws = _Workspace(head, two_buffers=grads.expected_logit is not None, dw=needs.dw)
        out = _Gradients(head, needs, ws)
        for group in ws.groups(head.y.shape[0]):
            x = ws.products(head, group)
            for rows in ws.blocks(group):
                z, f, o = ws.logits(group, rows)
                p = ws.exp_shifted(z, stats.lse[rows])
                g = StatGrads(*(None if t is None else t[rows] for t in grads))
                _keep(o, ws.dz(head, rows, z, p, f, stats.expected_logit[rows], g))
            out.add(group, ws.out[: group.stop - group.start], x)
        return out.result()

    def single_pass(self, head: Head, block_loss: BlockLoss, needs: Needs, topk: int = 0,
                    filter_eps: Optional[float] = None, *, expected_logit: bool = True,
                    weighted_logit_sum: bool = True, argmax: bool = True, rows: Optional[Tensor] = None):
        ws = _Workspace(head, two_buffers=expected_logit, dw=needs.dw, rows=rows)
        out = _Gradients(head, needs, ws)
        parts, loss = [], 0
        for group in ws.groups(head.y.shape[0]):
            x = ws.products(head, group)
            for rows in ws.blocks(group):
                z, f, o = ws.logits(group, rows)
                stats, e, sum_exp = ws.stats(head, rows, z, topk, expected_logit, weighted_logit_sum, argmax)
                block, grads = block_loss(rows, stats)
                loss = loss + block
                if any(needs):
                    _keep(o, ws.dz(head, rows, z, e, f, stats.expected_logit, grads, inv=sum_exp.reciprocal()))
                parts.append(stats)
            if any(needs):
                out.add(group, ws.out[: group.stop - group.start], x)
        return (loss, _concat(parts), *out.result())


def _concat(parts) -> Stats:
    if len(parts) == 1:
        return parts[0]
    return Stats(*(None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(len(Stats._fields))))
