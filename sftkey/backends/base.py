"""The backend contract: what a backend is given, what it computes, what it returns.

Symbols are docs/design.md's. A backend sees a :class:`Head`, flattened and validated:

* ``x``  ``[M, D]`` hidden states, ``w`` ``[V, D]`` LM head, ``b`` ``[V]`` or None; one dtype
  (float32, bfloat16, float16 or float64), contiguous, one device.
* ``rows`` ``[N]`` int64 or None: the rows of ``x`` the tokens are (None: all, ``N = M``).
  A loss skips the tokens that have none this way; ``dX`` is zero on the other rows. A
  backend reads the rows itself (the torch backend gathers them group by group) or through
  :meth:`Head.gathered` and :meth:`Head.scattered`.
* ``y``  ``[N]`` int64 targets, ``-1`` where the token has no target (ignored): its target
  logit is 0 and it receives no one-hot gradient.
* ``c``  ``[V]`` class weights in the accumulation dtype, or None (meaning ones): ``Z_i = sum_j c_j z_ij``.
* ``softcap`` positive float or None: ``z <- softcap * tanh(z / softcap)``.

Logits ``z = x w^T + b`` (then soft-capped) are never materialized beyond a bounded block.
Statistics are float32 (float64 for float64 inputs); gradients come back in the dtype of
the input they belong to.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor

#: The most top-k logits a backend returns per token.
MAX_TOPK = 32


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and sums are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Head:
    """The inputs that define the logits, as a backend receives them (see the module docstring)."""

    x: Tensor
    w: Tensor
    b: Optional[Tensor]
    y: Tensor
    c: Optional[Tensor]
    softcap: Optional[float]
    rows: Optional[Tensor] = None

    def gathered(self) -> "Head":
        """The same tokens with their hidden states copied out (``rows`` None)."""
        return self if self.rows is None else replace(self, x=self.x.index_select(0, self.rows), rows=None)

    def scattered(self, dx: Optional[Tensor]) -> Optional[Tensor]:
        """``dX`` of :meth:`gathered`'s rows as the gradient of the whole ``x`` (zero elsewhere)."""
        if dx is None or self.rows is None:
            return dx
        return torch.zeros_like(self.x).index_copy_(0, self.rows, dx)


@dataclass(frozen=True)
class RowStats:
    """Per-token statistics of the logits rows, each ``[N]`` unless stated.

    ``lse``: logsumexp_j z_ij; ``target_logit``: z_{i,y_i} (0 where y_i < 0);
    ``expected_logit``: S_i = sum_j p_ij z_ij; ``weighted_logit_sum``: Z_i = sum_j c_j z_ij;
    ``argmax``: int64 argmax_j z_ij; ``topk``: ``[N, k]`` the k largest logits, descending.
    ``expected_logit``, ``weighted_logit_sum``, ``argmax`` and ``topk`` are None where not
    computed (a single pass told they are not read; no top-k asked for).
    """

    lse: Tensor
    target_logit: Tensor
    expected_logit: Optional[Tensor] = None
    weighted_logit_sum: Optional[Tensor] = None
    argmax: Optional[Tensor] = None
    topk: Optional[Tensor] = None

    def items(self):
        """``(name, tensor or None)`` for every statistic, in field order."""
        return ((f.name, getattr(self, f.name)) for f in fields(self))

    @classmethod
    def cat(cls, parts: list) -> "RowStats":
        """The statistics of consecutive blocks of rows, concatenated."""
        if len(parts) == 1:
            return parts[0]
        return cls(**{name: None if value is None else torch.cat([getattr(p, name) for p in parts])
                      for name, value in parts[0].items()})

    @classmethod
    def interleave(cls, keep: Tensor, kept: "RowStats", others: "RowStats") -> "RowStats":
        """Every token's statistics from ``kept`` (the tokens where ``keep``) and ``others`` (the
        rest, in order); a statistic ``kept`` lacks stays None."""
        merged = {}
        for name, part in kept.items():
            rest = getattr(others, name)
            if part is None or rest is None:
                merged[name] = None
                continue
            full = part.new_empty((keep.shape[0], *part.shape[1:]))
            full[keep], full[~keep] = part, rest
            merged[name] = full
        return cls(**merged)


class StatGrads(NamedTuple):
    """Upstream gradients of the four differentiable statistics, each ``[N]`` or None (zero)."""

    lse: Optional[Tensor]
    target_logit: Optional[Tensor]
    expected_logit: Optional[Tensor]
    weighted_logit_sum: Optional[Tensor]


class Needs(NamedTuple):
    """Which gradients to form: ``dx``, ``dw``, ``db``."""

    dx: bool
    dw: bool
    db: bool


class Reads(NamedTuple):
    """Which statistics beyond ``lse`` and ``target_logit`` a single pass's caller reads; a
    backend may skip the others and return None for them."""

    expected_logit: bool = True
    weighted_logit_sum: bool = True
    argmax: bool = True


class BlockResult(NamedTuple):
    """A block's share of a single pass's scalar loss, and its upstream gradients with respect
    to the block's statistics (all None where no gradient is formed)."""

    loss: Tensor
    grads: StatGrads


class BlockLoss(Protocol):
    """The loss of a single pass, block by block: called with a block of rows (a slice of the
    head's tokens) and their statistics."""

    def __call__(self, block: slice, stats: RowStats) -> BlockResult: ...


class SinglePassResult(NamedTuple):
    loss: Tensor
    stats: RowStats
    dx: Optional[Tensor]
    dw: Optional[Tensor]
    db: Optional[Tensor]


class Backend:
    """A way to compute :class:`RowStats` and their backward. Subclasses implement ``forward``
    and ``backward``; ``single_pass`` may be overridden where the loss's gradients can be
    formed during the forward (docs/design.md, "Single pass")."""

    name: str = "base"

    def available(self, device: torch.device) -> bool:
        return True

    def forward(self, head: Head, topk: int = 0) -> RowStats:
        """Every statistic of every token (``topk``: also the ``topk`` largest logits)."""
        raise NotImplementedError

    def backward(self, head: Head, stats: RowStats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None):
        """Return ``(dx, dw, db)`` for the upstream ``grads``; an entry is None where not needed.

        Only ``stats.lse`` and ``stats.expected_logit`` are read (the full row's, also on a
        vocabulary shard). ``filter_eps``: skip the dense products of tiles whose
        probabilities are all below it (None: exact)."""
        raise NotImplementedError

    def single_pass(self, head: Head, block_loss: BlockLoss, needs: Needs, reads: Reads = Reads(),
                    filter_eps: Optional[float] = None) -> SinglePassResult:
        """The loss given block by block, its statistics and, where ``needs``, its gradients.
        With ``needs`` all False it is the loss alone (forward only, ``2NDV``).

        This generic version runs the forward over all tokens as one block, takes the loss's
        gradients, then the backward (8NDV FLOPs); backends override it to do better."""
        stats = self.forward(head)
        block = block_loss(slice(None), stats)
        if not any(needs):
            return SinglePassResult(block.loss, stats, None, None, None)
        return SinglePassResult(block.loss, stats, *self.backward(head, stats, block.grads, needs, filter_eps))
