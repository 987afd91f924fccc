"""The per-token loss on the logits' statistics: the formulas of docs/design.md, written once.

For a non-ignored token (``y_i >= 0``), with ``u_i = zy_i - lse_i`` (log p of the target),
class weights ``c`` (ones when absent) and ``eps`` the label smoothing::

    ce_i = (1 - eps) * c_{y_i} * (-u_i) + eps / V * (lse_i * sum_j c_j - Z_i)
    l_i  = a_i * s_i * ce_i + zeta * lse_i^2 - e_i * (lse_i - S_i)

``s_i = stopgrad(exp(u_i))`` under DFT, else 1. Ignored tokens have ``l_i = 0``. This is
torch's ``F.cross_entropy(weight=c, label_smoothing=eps)`` for ``a = 1``, ``zeta = e = 0``.
Everything here is on length-N vectors; autograd turns it into the upstream gradients of
the statistics that the backends' backward takes (:class:`TokenBlockLoss`, block by block
in a single pass). A new term of the loss is an option (:mod:`sftkey.options`), a field of
:class:`TokenTerms` read in :meth:`TokenTerms.of`, and its line in :func:`token_losses`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor

from ..backends.engine import BlockResult, RowStats, StatGrads


@dataclass(frozen=True)
class TokenTerms:
    """The loss's terms per token, flattened to ``[N]`` in the accumulation dtype: token weights
    ``a``, entropy weights ``e`` (or a scalar), class weights ``c`` ``[V]``, and the scalar
    coefficients."""

    vocab_size: int
    token_weights: Optional[Tensor] = None
    entropy_weights: Union[Tensor, float, None] = None
    class_weights: Optional[Tensor] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    dft: bool = False

    @classmethod
    def of(cls, options, per_token: dict, vocab_size: int, class_weights: Optional[Tensor]) -> "TokenTerms":
        """The terms an options object has (each field of this class that is one of its options,
        by name; the per-token ones flattened like the targets, ``per_token``), the others at
        their defaults."""
        names = set(cls.__dataclass_fields__) - {"vocab_size", "class_weights"}
        terms = {name: per_token.get(name, getattr(options, name)) for name in names if hasattr(options, name)}
        return cls(vocab_size=vocab_size, class_weights=class_weights, **terms)

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
    c = terms.class_weights
    ce = -u if c is None else -u * c[y.clamp_min(0)]
    if eps > 0:
        c_sum = terms.vocab_size if c is None else c.sum()
        ce = (1 - eps) * ce + (eps / terms.vocab_size) * (lse * c_sum - Z)
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
    a cross-entropy weight (``a_i``, or ``c_{y_i}`` without label smoothing), an entropy
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
    """``sum_i a_i c_{y_i}`` over non-ignored tokens (their count without weights), in ``dtype``."""
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


@dataclass(frozen=True)
class TokenBlockLoss:
    """A single pass's :class:`~sftkey.backends.engine.BlockLoss` for ``sum_i l_i / scale``:
    the block's loss and, ``with_grads``, its gradients with respect to the statistics."""

    y: Tensor
    terms: TokenTerms
    scale: Tensor
    with_grads: bool

    def __call__(self, block: slice, stats: RowStats) -> BlockResult:
        y, terms = self.y[block], self.terms.select(block)
        if not self.with_grads:
            loss = token_losses(stats, y, terms).sum() / self.scale.to(stats.lse.dtype)
            return BlockResult(loss, StatGrads(None, None, None, None))
        with torch.enable_grad():
            leaves = {name: getattr(stats, name).detach().requires_grad_() for name in StatGrads._fields
                      if getattr(stats, name) is not None}
            loss = token_losses(replace(stats, **leaves), y, terms).sum() / self.scale.to(stats.lse.dtype)
            grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
        return BlockResult(loss.detach(), StatGrads(**{name: grads.get(name) for name in StatGrads._fields}))
