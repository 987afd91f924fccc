"""The triton backend (``backend="triton"``): the single pass of a scalar loss on the group
engine (:mod:`.engine`), its block math in Triton row kernels (:mod:`sftkey.kernels.rows`);
the two-head pass's forward and reverse KL rows in Triton (:mod:`sftkey.kernels.pair_rows`);
``reduction="none"`` and ``logit_stats`` as ``"triton-fused"`` (:mod:`.triton_fused`).

Rows go in groups as the torch backend's (:func:`.torch.group_budget`: on CUDA at least the
bytes of a float32 ``dW``, at most a sixteenth of the free memory). For each group:

1. ``o = X_g W^T`` by ``torch.mm`` (cuBLAS on CUDA) into the chunk: float32 from bf16/fp16
   inputs where this torch has float32-output products on the device
   (:func:`.products.float32_output`), else in the inputs' dtype;
2. :func:`~sftkey.kernels.rows.row_stats` reads ``o`` once for the statistics the loss reads;
   the loss gives the group's upstream gradients;
3. :func:`~sftkey.kernels.rows.row_grads` writes ``dz`` over ``o`` in the inputs' dtype (a
   bf16/fp16 view of a float32 ``o`` keeps its row stride, and the kernel zeroes the rest of
   each row, so that the products below read no stale float32 bits there);
4. ``dX = dz W`` and ``dW += dz^T X_g`` by ``torch.mm``, summed across groups in float32 (a
   bf16/fp16 ``dW`` by one float32-output ``addmm`` per group where the device has it).

``6NDV`` FLOPs in the matrix products plus three passes over a group's logits; extra memory
one chunk plus, for a bf16/fp16 ``dW`` over several groups, its float32 sum: on CUDA at most
twice the larger of the chunk budget and the float32 ``dW``'s ``4VD`` bytes.
"""
from __future__ import annotations

from typing import Optional

import torch

from sftkey.core.divergence import KL_KINDS
from sftkey.kernels.configs import RowConfig, known_gpu, row_config
from sftkey.kernels.pair_rows import kl_rows
from sftkey.kernels.rows import row_grads, row_stats

from .engine import BlockLoss, Head, Needs, Reads, RowStats, SinglePassResult, run
from .products import LOWP_DTYPES, float32_output
from .torch import group_budget, operand
from .triton_fused import FusedTritonBackend, check_dtype, check_inputs, or_torch


def logits_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a group's logits products: float32 from bf16/fp16 where the device has
    float32-output products, else the inputs' dtype."""
    lowp = x.dtype in LOWP_DTYPES
    return torch.float32 if lowp and float32_output(x.device.type, x.dtype) else x.dtype


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
        check_inputs(head)
        op = operand(head, needs, logits_dtype(head.x), group_budget(head, needs), float32_output=True,
                     float32_sums=True)
        cfg = self.row_config or row_config(head.x.device)
        c = None if head.c is None else head.c.float()
        parts, losses = [], []
        grads = any(needs)

        def work(group: slice, chunks: list) -> tuple:
            o, y = chunks[0], head.y[group]
            lse, zy, S, Z, argmax = row_stats(o, y, head.b, c, head.softcap, reads.expected_logit,
                                              reads.weighted_logit_sum, reads.argmax, cfg)
            stats = RowStats(lse, zy, S, Z, argmax)
            part = block_loss(group, stats)
            losses.append(part.loss)
            if grads:
                row_grads(o, op.dz(group), y, head.b, c, head.softcap, lse, S, part.grads, cfg)
            parts.append(stats)
            return (grads,)

        run([op], work)
        return SinglePassResult(sum(losses), RowStats.cat(parts), *op.result())

    def two_head_rows(self, kind: str, dtype: torch.dtype, device: torch.device):
        """The forward and reverse KL's rows in Triton (:func:`sftkey.kernels.pair_rows.kl_rows`)
        where the kernels have launch settings for ``device``; None for the JSD (torch)."""
        if kind not in KL_KINDS or not known_gpu(device):
            return None
        check_dtype(dtype)
        cfg = self.row_config or row_config(device)

        def rows(z, r, g, want_dz, want_dr):
            return kl_rows(z, r, kind, g, want_dz, want_dr, cfg)

        return rows

