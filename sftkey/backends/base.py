"""What every backend computes: the per-token statistics of the logits and their backward.

Symbols are DESIGN.md's. A backend sees flattened, validated inputs:

* ``x``  ``[N, D]`` hidden states, ``w`` ``[V, D]`` LM head, ``b`` ``[V]`` or None; one dtype
  (float32, bfloat16, float16 or float64), contiguous, one device.
* ``y``  ``[N]`` int64 targets, ``-1`` where the token has no target (ignored): its target
  logit is 0 and it receives no one-hot gradient.
* ``c``  ``[V]`` float32 class weights or None (meaning ones): ``Z_i = sum_j c_j z_ij``.
* ``softcap`` positive float or None: ``z <- softcap * tanh(z / softcap)``.

Logits ``z = x w^T + b`` (then soft-capped) are never materialized beyond a bounded block.
Statistics are float32 (float64 for float64 inputs); gradients come back in the dtype of
the input they belong to.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and sums are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Stats(NamedTuple):
    """Per-token statistics of one logits row, each ``[N]`` unless stated.

    ``lse``: logsumexp_j z_ij; ``target_logit``: z_{i,y_i} (0 where y_i < 0);
    ``expected_logit``: S_i = sum_j p_ij z_ij; ``weighted_logit_sum``: Z_i = sum_j c_j z_ij;
    ``argmax``: int64 argmax_j z_ij; ``topk``: ``[N, k]`` the k largest logits, descending
    (None when k = 0). ``expected_logit``, ``weighted_logit_sum`` and ``argmax`` may be None
    where a single pass was told they are not needed.
    """

    lse: Tensor
    target_logit: Tensor
    expected_logit: Optional[Tensor]
    weighted_logit_sum: Optional[Tensor]
    argmax: Optional[Tensor]
    topk: Optional[Tensor] = None


class StatGrads(NamedTuple):
    """Upstream gradients of the four differentiable statistics, each ``[N]`` float32 or None (zero)."""

    lse: Optional[Tensor]
    target_logit: Optional[Tensor]
    expected_logit: Optional[Tensor]
    weighted_logit_sum: Optional[Tensor]


class Needs(NamedTuple):
    """Which gradients to form: ``dx``, ``dw``, ``db``."""

    dx: bool
    dw: bool
    db: bool


@dataclass(frozen=True)
class Head:
    """The inputs that define the logits, as a backend receives them."""

    x: Tensor
    w: Tensor
    b: Optional[Tensor]
    y: Tensor
    c: Optional[Tensor]
    softcap: Optional[float]


#: ``block_loss(rows, stats_of_those_rows) -> (loss_sum, grads)``: the loss summed over the
#: block's rows (already divided by the reduction's denominator) and its gradients with
#: respect to the block's statistics. Built by :mod:`sftkey.autograd` from :mod:`sftkey.loss`.
BlockLoss = Callable[[slice, Stats], "tuple[Tensor, StatGrads]"]


class Backend:
    """A way to compute :class:`Stats` and their backward. Subclasses implement ``forward``
    and ``backward``; ``single_pass`` may be overridden where the loss's gradients can be
    formed during the forward (DESIGN.md, "Single pass for scalar reductions")."""

    name: str = "base"

    def available(self, device: torch.device) -> bool:
        return True

    def forward(self, head: Head, topk: int = 0) -> Stats:
        raise NotImplementedError

    def backward(self, head: Head, stats: Stats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None):
        """Return ``(dx, dw, db)`` for the upstream ``grads``; an entry is None where not needed.

        Only ``stats.lse`` and ``stats.expected_logit`` are read (so a caller may pass global
        values for a vocabulary shard). ``filter_eps``: skip the dense products of tiles whose
        probabilities are all below it (None: exact)."""
        raise NotImplementedError

    def single_pass(self, head: Head, block_loss: BlockLoss, needs: Needs, topk: int = 0,
                    filter_eps: Optional[float] = None, *, expected_logit: bool = True,
                    weighted_logit_sum: bool = True, argmax: bool = True, rows: Optional[Tensor] = None):
        """Return ``(loss, stats, dx, dw, db)`` for a scalar loss given block by block.
        ``expected_logit``/``weighted_logit_sum``/``argmax`` False: neither the loss nor the
        caller reads that statistic, so a backend may skip it (and return None for it). With
        ``needs`` all False it is the loss alone (forward only, ``2NDV``). ``rows``: the rows of
        ``head.x`` that ``head.y`` (and the loss) refer to, None for all; ``dx`` is zero on the
        other rows.

        This generic version runs the forward over all rows, takes the loss's gradients on
        the statistics, then the backward (8NDV FLOPs); backends override it to do better.
        """
        if rows is not None:
            full_x, head = head.x, replace(head, x=head.x.index_select(0, rows))
        stats = self.forward(head, topk)
        loss, grads = block_loss(slice(None), stats)
        if not any(needs):
            return loss, stats, None, None, None
        dx, dw, db = self.backward(head, stats, grads, needs, filter_eps)
        if dx is not None and rows is not None:
            dx = torch.zeros_like(full_x).index_copy_(0, rows, dx)
        return loss, stats, dx, dw, db
