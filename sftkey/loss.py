"""The per-token loss on the logits' statistics: DESIGN.md's formulas, written once.

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

from .backends.base import StatGrads, Stats


@dataclass(frozen=True)
class LossOptions:
    """The loss's options, validated and flattened to ``[N]`` (float32 or float64 tensors)."""

    vocab_size: int
    token_weights: Optional[Tensor] = None
    entropy_weights: Union[Tensor, float, None] = None
    class_weights: Optional[Tensor] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    dft: bool = False

    def rows(self, rows: Union[slice, Tensor]) -> "LossOptions":
        """The options restricted to some rows (a slice, or an index tensor)."""
        ew = self.entropy_weights
        return replace(
            self,
            token_weights=None if self.token_weights is None else self.token_weights[rows],
            entropy_weights=ew[rows] if isinstance(ew, Tensor) and ew.dim() > 0 else ew,
        )

    @property
    def uses_expected_logit(self) -> bool:
        """Whether the loss reads ``S`` (the entropy term)."""
        return self.entropy_weights is not None

    @property
    def uses_weighted_logit_sum(self) -> bool:
        """Whether the loss reads ``Z`` (label smoothing)."""
        return self.label_smoothing > 0


def token_losses(stats: Stats, y: Tensor, opts: LossOptions) -> Tensor:
    """``l_i`` for every token, ``[N]``; ``y`` is ``[N]`` with ``-1`` for ignored tokens."""
    lse, zy, S, Z = stats.lse, stats.target_logit, stats.expected_logit, stats.weighted_logit_sum
    valid = y >= 0
    u = zy - lse
    eps = opts.label_smoothing
    w = opts.class_weights
    ce = -u if w is None else -u * w[y.clamp_min(0)]
    if eps > 0:
        w_sum = opts.vocab_size if w is None else w.sum()
        ce = (1 - eps) * ce + (eps / opts.vocab_size) * (lse * w_sum - Z)
    if opts.token_weights is not None:
        ce = ce * opts.token_weights
    if opts.dft:
        ce = ce * u.detach().exp()
    loss = ce
    if opts.z_loss:
        loss = loss + opts.z_loss * lse.square()
    if opts.entropy_weights is not None:
        loss = loss - opts.entropy_weights * (lse - S)
    return torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def contributing(y: Tensor, opts: LossOptions) -> Tensor:
    """Bool ``[N]``: the tokens whose ``l_i`` is not identically zero, i.e. not ignored and with
    a cross-entropy weight (``a_i``, or ``w_{y_i}`` without label smoothing), an entropy
    weight ``e_i`` or the z-loss. The others have no loss and no gradient."""
    valid = y >= 0
    if opts.z_loss:
        return valid
    ce = valid
    if opts.token_weights is not None:
        ce = ce & (opts.token_weights != 0)
    if opts.class_weights is not None and opts.label_smoothing == 0:
        ce = ce & (opts.class_weights[y.clamp_min(0)] != 0)
    ew = opts.entropy_weights
    if ew is None or (not isinstance(ew, Tensor) and ew == 0):
        return ce
    return ce | (valid & (torch.as_tensor(ew, device=y.device) != 0))


def weight_sum(y: Tensor, opts: LossOptions, dtype=torch.float32) -> Tensor:
    """``sum_i a_i w_{y_i}`` over non-ignored tokens (their count without weights), in ``dtype``."""
    per_token = (y >= 0).to(dtype)
    if opts.class_weights is not None:
        per_token = per_token * opts.class_weights[y.clamp_min(0)].to(dtype)
    if opts.token_weights is not None:
        per_token = per_token * opts.token_weights.to(dtype)
    return per_token.sum()


def denominator(y: Tensor, opts: LossOptions, normalizer=None, dtype=torch.float32) -> Tensor:
    """The ``"mean"`` reduction's divisor in ``dtype``: :func:`weight_sum`, or ``normalizer``;
    1 where that is 0, so an all-ignored batch gives loss 0, not NaN."""
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=dtype, device=y.device).reshape(())
    return nonzero(weight_sum(y, opts, dtype))


def nonzero(total: Tensor) -> Tensor:
    """``total``, or 1 where it is 0."""
    return torch.where(total == 0, torch.ones_like(total), total)


def reduce(losses: Tensor, reduction: str, denom: Optional[Tensor]) -> Tensor:
    """Apply ``reduction`` ("none", "sum", "mean") to per-token losses."""
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / denom.to(total.dtype)


def block_loss_fn(y: Tensor, opts: LossOptions, scale: Tensor, with_grads: bool = True):
    """A :data:`~sftkey.backends.base.BlockLoss` for ``sum_i l_i / scale``: a backend calls it on
    each block of rows' statistics and gets the block's loss and its upstream gradients (all
    None without ``with_grads``: the loss alone, e.g. under ``torch.inference_mode``)."""

    def block_loss(rows: slice, stats: Stats):
        if not with_grads:
            loss = token_losses(stats, y[rows], opts.rows(rows)).sum() / scale.to(stats.lse.dtype)
            return loss, StatGrads(None, None, None, None)
        with torch.enable_grad():
            leaves = [None if s is None else s.detach().requires_grad_() for s in stats[:4]]
            part = Stats(*leaves, stats.argmax, stats.topk)
            loss = token_losses(part, y[rows], opts.rows(rows)).sum() / scale.to(leaves[0].dtype)
            used = [s for s in leaves if s is not None]
            grads = iter(torch.autograd.grad(loss, used, allow_unused=True))
        return loss.detach(), StatGrads(*(None if s is None else next(grads) for s in leaves))

    return block_loss
