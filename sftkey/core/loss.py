"""The per-token loss on the logits' statistics: the formulas of docs/design.md, written once.

For a non-ignored token (``y_i >= 0``), with ``u_i = zy_i - lse_i`` (log p of the target),
class weights ``w`` (ones when absent) and ``eps`` the label smoothing::

    ce_i = (1 - eps) * w_{y_i} * (-u_i) + eps / V * (lse_i * sum_j w_j - Z_i)
    l_i  = a_i * s_i * ce_i + zeta * lse_i^2 - e_i * (lse_i - S_i)

``s_i = stopgrad(exp(u_i))`` under DFT, else 1. Ignored tokens have ``l_i = 0``. This is
torch's ``F.cross_entropy(weight=w, label_smoothing=eps)`` for ``a = 1``, ``zeta = e = 0``.
Everything here is on length-N vectors; autograd turns it into the upstream gradients of
the statistics that the backends' backward takes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor

from ..backends.base import RowStats


@dataclass(frozen=True)
class TokenTerms:
    """The loss's terms per token, flattened to ``[N]`` in the accumulation dtype: token weights
    ``a``, entropy weights ``e`` (or a scalar), class weights ``w`` ``[V]``, and the scalar
    coefficients."""

    vocab_size: int
    token_weights: Optional[Tensor] = None
    entropy_weights: Union[Tensor, float, None] = None
    class_weights: Optional[Tensor] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    dft: bool = False

    def select(self, index: Union[slice, Tensor]) -> "TokenTerms":
        """The terms of some tokens (a slice, or an index tensor)."""
        ew = self.entropy_weights
        return replace(
            self,
            token_weights=None if self.token_weights is None else self.token_weights[index],
            entropy_weights=ew[index] if isinstance(ew, Tensor) and ew.dim() > 0 else ew,
        )

    @property
    def reads_expected_logit(self) -> bool:
        """Whether the loss reads ``S`` (the entropy term)."""
        return self.entropy_weights is not None

    @property
    def reads_weighted_logit_sum(self) -> bool:
        """Whether the loss reads ``Z`` (label smoothing)."""
        return self.label_smoothing > 0


def token_losses(stats: RowStats, y: Tensor, terms: TokenTerms) -> Tensor:
    """``l_i`` for every token, ``[N]``; ``y`` is ``[N]`` with ``-1`` for ignored tokens."""
    lse, zy, S, Z = stats.lse, stats.target_logit, stats.expected_logit, stats.weighted_logit_sum
    valid = y >= 0
    u = zy - lse
    eps = terms.label_smoothing
    w = terms.class_weights
    ce = -u if w is None else -u * w[y.clamp_min(0)]
    if eps > 0:
        w_sum = terms.vocab_size if w is None else w.sum()
        ce = (1 - eps) * ce + (eps / terms.vocab_size) * (lse * w_sum - Z)
    if terms.token_weights is not None:
        ce = ce * terms.token_weights
    if terms.dft:
        ce = ce * u.detach().exp()
    loss = ce
    if terms.z_loss:
        loss = loss + terms.z_loss * lse.square()
    if terms.entropy_weights is not None:
        loss = loss - terms.entropy_weights * (lse - S)
    return torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def contributing(y: Tensor, terms: TokenTerms) -> Tensor:
    """Bool ``[N]``: the tokens whose ``l_i`` is not identically zero, i.e. not ignored and with
    a cross-entropy weight (``a_i``, or ``w_{y_i}`` without label smoothing), an entropy
    weight ``e_i`` or the z-loss. The others have no loss and no gradient."""
    valid = y >= 0
    if terms.z_loss:
        return valid
    ce = valid
    if terms.token_weights is not None:
        ce = ce & (terms.token_weights != 0)
    if terms.class_weights is not None and terms.label_smoothing == 0:
        ce = ce & (terms.class_weights[y.clamp_min(0)] != 0)
    ew = terms.entropy_weights
    if ew is None or (not isinstance(ew, Tensor) and ew == 0):
        return ce
    return ce | (valid & (torch.as_tensor(ew, device=y.device) != 0))


def weight_sum(y: Tensor, terms: TokenTerms, dtype=torch.float32) -> Tensor:
    """``sum_i a_i w_{y_i}`` over non-ignored tokens (their count without weights), in ``dtype``."""
    per_token = (y >= 0).to(dtype)
    if terms.class_weights is not None:
        per_token = per_token * terms.class_weights[y.clamp_min(0)].to(dtype)
    if terms.token_weights is not None:
        per_token = per_token * terms.token_weights.to(dtype)
    return per_token.sum()


def denominator(y: Tensor, terms: TokenTerms, normalizer=None, dtype=torch.float32) -> Tensor:
    """The ``"mean"`` reduction's divisor in ``dtype``: :func:`weight_sum`, or ``normalizer``;
    1 where that is 0, so an all-ignored batch gives loss 0, not NaN."""
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=dtype, device=y.device).reshape(())
    return nonzero(weight_sum(y, terms, dtype))


def nonzero(total: Tensor) -> Tensor:
    """``total``, or 1 where it is 0."""
    return torch.where(total == 0, torch.ones_like(total), total)


def reduce(losses: Tensor, reduction: str, denom: Optional[Tensor]) -> Tensor:
    """Apply ``reduction`` ("none", "sum", "mean") to per-token losses."""
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / denom.to(total.dtype)
