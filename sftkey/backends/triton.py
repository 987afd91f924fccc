"""The Triton backend (``backend="triton"``): the single pass of a scalar loss with the torch
backend's structure, its block math in Triton (:mod:`sftkey.kernels.rows`).

Rows go in groups within :data:`sftkey.config.chunk_budget_bytes`, on CUDA at least the bytes
of a float32 ``dW`` (:func:`group_budget`; the torch backend's
:class:`~sftkey.backends.torch._Workspace`). For each group:

1. ``o = X_g W^T`` by ``torch.mm`` (cuBLAS on CUDA) into the group's buffer: float32 from
   bf16/fp16 inputs where this torch has ``torch.mm(..., out_dtype=torch.float32)`` for the
   device (checked once per device type), else in the inputs' dtype;
2. :func:`~sftkey.kernels.rows.row_stats_kernel` reads ``o`` once for the statistics the loss
   reads; the loss gives the group's upstream gradients;
3. :func:`~sftkey.kernels.rows.row_grads_kernel` writes ``dz`` over ``o`` in the inputs'
   dtype (a bf16/fp16 view of a float32 ``o`` keeps its row stride, and the kernel zeroes
   the rest of each row, so that the products below read no stale float32 bits there);
4. ``dX = dz W`` and ``dW += dz^T X_g`` by ``torch.mm``, summed across groups in float32
   (the torch backend's :class:`~sftkey.backends.torch._Gradients`; a bf16/fp16 ``dW`` by one
   float32-output ``addmm`` per group where the device has it).

``6NDV`` FLOPs in the matrix products plus three passes over a group's logits; extra memory
one group's buffer plus, for a bf16/fp16 ``dW`` over several groups, its float32 sum: on CUDA
at most twice the larger of the chunk budget and the float32 ``dW``'s ``4VD`` bytes.
``reduction="none"`` and ``logit_stats`` take the fused kernels' recompute (inherited from
:class:`~sftkey.backends.triton_fused.FusedTritonBackend`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from sftkey import config
from sftkey.kernels.configs import RowConfig, row_config
from sftkey.kernels.rows import row_grads_kernel, row_stats_kernel

from .base import BlockLoss, Head, Needs, Reads, RowStats, SinglePassResult, StatGrads
from .torch import _Gradients, _Workspace
from .triton_fused import FusedTritonBackend, _check, or_torch

_LOWP = (torch.bfloat16, torch.float16)


@lru_cache(maxsize=None)
def float32_logits(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32, out=...)`` runs on ``dtype`` (bf16 or
    fp16) inputs on this device type (recent torch on CUDA; not on the CPU)."""
    a = torch.ones(2, 2, dtype=dtype, device=device_type)
    try:
        _mm_float32(a, a, torch.empty(2, 2, device=device_type))
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _mm_float32(a: Tensor, b: Tensor, out: Tensor) -> None:
    torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_float32(c: Tensor, a: Tensor, b: Tensor) -> None:
    torch.addmm(c, a, b, out_dtype=torch.float32, out=c)


@lru_cache(maxsize=None)
def float32_sums(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` adds ``dtype`` products
    into a float32 ``c`` in place on this device type, checked on a small product against its
    float32 value."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).to(device_type, dtype)
    c = torch.randn(16, 16, generator=g).to(device_type)
    want = c + a.float() @ a.float()
    try:
        _addmm_float32(c, a, a)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return torch.allclose(c, want, rtol=1e-4, atol=1e-4)


def logits_dtype(x: Tensor) -> torch.dtype:
    """The dtype of a group's logits products: float32 from bf16/fp16 where the device has
    float32 output, else the inputs' dtype."""
    return torch.float32 if x.dtype in _LOWP and float32_logits(x.device.type, x.dtype) else x.dtype


def _products(x: Tensor, w: Tensor, o: Tensor) -> None:
    """``o = x w^T`` (``o`` float32 from bf16/fp16 ``x``, or in ``x``'s dtype)."""
    if o.dtype == x.dtype:
        torch.mm(x, w.t(), out=o)
    else:
        _mm_float32(x, w.t(), o)


class _Gradients32(_Gradients):
    """The torch backend's gradients, but a bf16/fp16 ``dW`` over several groups adds each group's
    product straight into its float32 sum where :func:`float32_sums` holds (one product per
    group, no staging through small slices)."""

    def _add_staged(self, dz: Tensor, x: Tensor, last: bool) -> None:
        if self.sum is None or not float32_sums(dz.device.type, dz.dtype):
            super()._add_staged(dz, x, last)
            return
        if self.first:
            self.sum.zero_()
        _addmm_float32(self.sum, dz.t(), x)
        if last:
            self.dw.copy_(self.sum)


def group_budget(head: Head, needs: Needs) -> int:
    """Bytes of one group's logits: the chunk budget, and on CUDA, where ``dW`` is formed, at
    least the float32 ``dW`` buffer's ``4VD``, so that the buffer is rewritten at most
    ``4NV / (4VD) = N / D`` times and each ``dW`` product sums over ``>= D`` rows (rather than
    the CPU budget's few dozen). Without ``dW`` (a frozen head, no grad) the budget alone."""
    budget = config.chunk_budget_bytes
    return max(budget, head.w.numel() * 4) if head.x.is_cuda and needs.dw else budget


def _flags(head: Head) -> dict:
    return dict(HAS_BIAS=head.b is not None, HAS_C=head.c is not None, SOFTCAP=head.softcap is not None)


def _gap(o: Tensor, dz: Tensor) -> int:
    """Columns of a narrower ``dz`` overlaid on ``o`` between its ``V`` columns and its row
    stride, which the kernel zeroes (0 where ``dz`` is ``o``)."""
    return dz.stride(0) - o.shape[1] if dz.element_size() < o.element_size() else 0


def _launch(cfg: RowConfig) -> dict:
    return dict(BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)


class TritonBackend(FusedTritonBackend):
    """cuBLAS products and Triton row kernels for the single pass (module docstring); the
    fused kernels for the statistics and their recompute backward. ``row_config`` overrides
    :func:`sftkey.kernels.configs.row_config`."""

    name = "triton"

    def __init__(self, row_config: Optional[RowConfig] = None, **fused):
        super().__init__(**fused)
        self.row_config = row_config

    @or_torch
    def single_pass(self, head: Head, block_loss: BlockLoss, needs: Needs, reads: Reads = Reads(),
                    filter_eps: Optional[float] = None) -> SinglePassResult:
        _check(head)
        x = head.x
        ws = _Workspace(head, two_buffers=False, dw=needs.dw, out_dtype=logits_dtype(x), budget=group_budget(head, needs))
        out = _Gradients32(head, needs, ws)
        cfg = self.row_config or row_config(x.device)
        parts, loss = [], 0
        for group in ws.groups(head.y.shape[0]):
            xg = ws.hidden(head, group)
            o = ws.out[: group.stop - group.start]
            _products(xg, head.w, o)
            stats = self._stats(head, group, o, reads, cfg)
            part = block_loss(group, stats)
            loss = loss + part.loss
            if any(needs):
                dz = o if o.dtype == x.dtype else o.view(x.dtype)[:, : o.shape[1]]
                self._dz(head, group, o, dz, stats, part.grads, cfg)
                out.add(group, dz, xg)
            parts.append(stats)
        return SinglePassResult(loss, RowStats.cat(parts), *out.result())

    @staticmethod
    def _stats(head: Head, group: slice, o: Tensor, reads: Reads, cfg: RowConfig) -> RowStats:
        """The statistics of a group's logits ``o`` (``S``, ``Z``, argmax None where not read)."""
        rows, dev = o.shape[0], o.device
        lse, zy = (torch.empty(rows, dtype=torch.float32, device=dev) for _ in range(2))
        S = torch.empty_like(lse) if reads.expected_logit else None
        Z = torch.empty_like(lse) if reads.weighted_logit_sum else None
        argmax = torch.empty(rows, dtype=torch.int64, device=dev) if reads.argmax else None
        row_stats_kernel[(rows,)](
            o, o.stride(0), head.b if head.b is not None else o, head.y[group],
            head.c if head.c is not None else lse, lse, zy,
            *(t if t is not None else lse for t in (S, Z, argmax)),
            o.shape[1], float(head.softcap or 1.0),
            HAS_S=S is not None, HAS_Z=Z is not None, ARGMAX=argmax is not None,
            **_flags(head), **_launch(cfg))
        return RowStats(lse, zy, S, Z, argmax)

    @staticmethod
    def _dz(head: Head, group: slice, o: Tensor, dz: Tensor, stats: RowStats, grads: StatGrads,
            cfg: RowConfig) -> None:
        """``dz`` of a group from its logits ``o`` and upstream ``grads``, into ``dz``."""
        g = [None if t is None else t.float().contiguous() for t in grads]
        dummy = stats.lse
        row_grads_kernel[(o.shape[0],)](
            o, o.stride(0), dz, dz.stride(0), head.b if head.b is not None else o, head.y[group],
            head.c if head.c is not None else dummy, stats.lse,
            stats.expected_logit if stats.expected_logit is not None else dummy,
            *(t if t is not None else dummy for t in g),
            o.shape[1], _gap(o, dz), float(head.softcap or 1.0),
            HAS_GLSE=g[0] is not None, HAS_GZY=g[1] is not None, HAS_GS=g[2] is not None,
            HAS_GZ=g[3] is not None, **_flags(head), **_launch(cfg))
