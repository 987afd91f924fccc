"""The passes of the two-head operations (docs/design.md, "Two heads"): which tokens go to
the two-head pass (:mod:`sftkey.backends.pair`), through which autograd Function, with which
block function.

* :func:`divergence`: :func:`sftkey.linear_divergence`. A scalar reduction takes the single
  pass (the gradients formed in the forward, over the tokens with a weight only);
  ``"none"``, or token weights that need a gradient, the recompute path (a forward for
  ``D_i``, a backward that recomputes both heads' logits).
* :func:`anchored_loss`: ``linear_cross_entropy(..., anchor=...)``: the cross-entropy loss of
  :mod:`sftkey.core.loss` plus ``anchor_weight * a_i * D_i``, in one pass over both heads for a
  scalar reduction; ``"none"`` adds the two recompute paths' per-token losses.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
from torch import Tensor

from . import divergence as div
from . import passes
from .autograd import outputs, scaled, stats_of
from ..backends.base import Head, Needs, RowStats
from ..backends.pair import Pair, PairBlock, pair_pass
from .inputs import Prepared, PreparedPair
from .loss import TokenTerms, contributing, denominator, nonzero, reduce, token_losses


@dataclass(frozen=True)
class Divergence:
    """Which divergence: ``kind``, ``beta`` (JSD) and the temperature both heads' logits are
    divided by; ``row_kernels``: its block math by the Triton row kernels
    (:func:`sftkey.backends.triton_pair.rows`, forward and reverse KL) rather than torch."""

    kind: str
    beta: float = 0.5
    temperature: float = 1.0
    row_kernels: bool = False

    def rows(self, z: Tensor, r: Tensor, g: Optional[Tensor] = None, want_dz: bool = True,
             want_dr: bool = False) -> div.RowDivergence:
        """:func:`sftkey.core.divergence.rows` of this divergence on a block, or its Triton rows."""
        if self.row_kernels:
            from ..backends.triton_pair import rows
        else:
            rows = div.rows
        return rows(z, r, self.kind, self.beta, g, want_dz, want_dr)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def row_kernels(backend, x: Tensor, kind: str) -> bool:
    """Whether the two-head block math of ``kind`` on hidden states ``x`` runs in the Triton row
    kernels: where the backend option ``backend`` resolves to the triton backend (``"triton"``,
    or ``"auto"`` on CUDA) on a device with its launch settings, ``kind`` is a KL (the options
    refuse ``"jsd"`` with ``"triton"``) and ``x`` float32, bfloat16 or float16 (float64 with
    ``backend="triton"`` raises a ``TypeError``; with ``"auto"`` it stays on torch)."""
    from ..backends import get_backend

    if get_backend(backend, x.device).name != "triton" or kind not in div.KL_KINDS:
        return False
    from ..backends.triton_fused import known_gpu  # triton imports only here (it may not be installed)

    if not known_gpu(x.device):
        return False
    if x.dtype not in _KERNEL_DTYPES:
        if isinstance(backend, str) and backend == "triton":
            raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {x.dtype}; "
                            "use backend='torch' for float64")
        return False
    return True


@dataclass(frozen=True)
class DivergenceBlock:
    """The block function of :func:`sftkey.linear_divergence`: ``sum_i coef_i D_i`` over the
    group and its gradients (``coef`` ``[N]``), or, with ``coef`` None, ``D_i`` per token
    and no gradient. ``softcap``: the policy's logits are soft-capped first (an anchor's)."""

    #: ``z``, ``r``, the factor under a soft-cap, and :func:`sftkey.core.divergence.rows`'s (JSD: four)
    buffers: ClassVar[int] = 8

    d: Divergence
    coef: Optional[Tensor] = None
    want_dz: bool = True
    want_dr: bool = False
    softcap: Optional[float] = None

    def __call__(self, group: slice, z: Tensor, r: Tensor) -> PairBlock:
        T, cap = self.d.temperature, self.softcap
        if cap is not None:
            z = z.div_(cap).tanh_().mul_(cap)
        if T != 1.0:
            z.div_(T)
            r.div_(T)
        coef = None if self.coef is None else self.coef[group]
        g = None if coef is None else coef / T
        factor = None  # d(capped)/dz = 1 - (capped / cap)^2, taken before rows() overwrites z
        if cap is not None and g is not None:
            factor = z.mul(T / cap).square_().neg_().add_(1)
        rows = self.d.rows(z, r, g, self.want_dz, self.want_dr)
        dz = rows.dz
        if factor is not None and dz is not None:
            dz.mul_(factor)
        loss = rows.value if coef is None else torch.linalg.vecdot(rows.value, coef)
        return PairBlock(loss, dz, rows.dr)


@dataclass(frozen=True)
class PairPlan:
    """What the two-head Functions need besides the six tensors: the heads' other fields, the
    block function and the caller's grad mode."""

    policy: Head
    ref: Head
    block_fn: object
    grad_enabled: bool = True

    def pair(self, x, w, b, xr, wr, br) -> Pair:
        return Pair(replace(self.policy, x=x, w=w, b=b), replace(self.ref, x=xr, w=wr, b=br))


def _needs(ctx, b, br, enabled: bool = True) -> tuple:
    n = ctx.needs_input_grad
    if not enabled:
        return Needs(False, False, False), Needs(False, False, False)
    return Needs(n[0], n[1], b is not None and n[2]), Needs(n[3], n[4], br is not None and n[5])


class PairSinglePass(torch.autograd.Function):
    """``(x, w, b, x_ref, w_ref, b_ref) -> (loss, *RowStats)`` for a scalar loss: the block
    function forms the gradients during the forward; the backward scales them. The statistics
    (the blocks' ``extra``, where there are any) are returned detached."""

    @staticmethod
    def forward(ctx, x, w, b, xr, wr, br, plan: PairPlan):
        needs, ref_needs = _needs(ctx, b, br, plan.grad_enabled)
        result = pair_pass(plan.pair(x, w, b, xr, wr, br), plan.block_fn, needs, ref_needs)
        ctx.save_for_backward(*result.policy_grads, *result.ref_grads)
        loss = sum(block.loss for block in result.blocks)
        extras = [block.extra for block in result.blocks if block.extra is not None]
        out = outputs(RowStats.cat(extras)) if extras else ()
        ctx.mark_non_differentiable(*out)
        return (torch.as_tensor(loss, device=x.device), *out)

    @staticmethod
    def backward(ctx, g_loss, *_):
        return (*scaled(ctx.saved_tensors, g_loss), None)


class PairRecompute(torch.autograd.Function):
    """``(x, w, b, x_ref, w_ref, b_ref) -> D [N]``, the divergence per token; the backward
    recomputes both heads' logits and takes the upstream gradient per token."""

    @staticmethod
    def forward(ctx, x, w, b, xr, wr, br, plan: PairPlan):
        result = pair_pass(plan.pair(x, w, b, xr, wr, br), plan.block_fn, *_needs(ctx, b, br, False))
        ctx.save_for_backward(x, w, b, xr, wr, br)
        ctx.plan = plan
        return torch.cat([block.loss for block in result.blocks])

    @staticmethod
    def backward(ctx, g):
        plan = ctx.plan
        needs, ref_needs = _needs(ctx, ctx.saved_tensors[2], ctx.saved_tensors[5])
        block_fn = replace(plan.block_fn, coef=g.contiguous(), want_dz=any(needs), want_dr=any(ref_needs))
        result = pair_pass(plan.pair(*ctx.saved_tensors), block_fn, needs, ref_needs)
        return (*result.policy_grads, *result.ref_grads, None)


def _tensors(pair: Pair) -> tuple:
    return pair.policy.x, pair.policy.w, pair.policy.b, pair.ref.x, pair.ref.w, pair.ref.b


def _with_rows(pair: Pair, rows: Tensor) -> Pair:
    return Pair(replace(pair.policy, rows=rows, y=pair.policy.y[rows]), replace(pair.ref, rows=rows, y=pair.ref.y[rows]))


def per_token(pair: Pair, d: Divergence) -> Tensor:
    """``D_i`` of every token of ``pair``, differentiable (the recompute path; the policy's
    logits soft-capped where its head says)."""
    block_fn = DivergenceBlock(d, softcap=pair.policy.softcap)
    return PairRecompute.apply(*_tensors(pair), PairPlan(pair.policy, pair.ref, block_fn))


def _selected(keep: Tensor):
    """The indices of the tokens where ``keep``, or None where that is every token or none
    (then every token goes, those without a loss with coefficient 0)."""
    count = int(keep.sum())
    return keep.nonzero().squeeze(1) if 0 < count < keep.numel() else None


def divergence(pp: PreparedPair, d: Divergence, reduction: str, normalizer) -> Tensor:
    """:func:`sftkey.linear_divergence`'s loss: ``sum_i a_i D_i`` over the tokens that count,
    reduced as asked (``"mean"``: over ``sum_i a_i``, or ``normalizer``)."""
    coef = pp.valid.to(pp.acc) if pp.weights is None else torch.where(pp.valid, pp.weights, 0)
    weights_grad = isinstance(pp.weights, Tensor) and pp.weights.requires_grad and torch.is_grad_enabled()
    denom = None
    if reduction == "mean":
        denom = nonzero(coef.sum()) if normalizer is None else torch.as_tensor(
            normalizer, dtype=pp.acc, device=coef.device).reshape(())
    if reduction == "none" or weights_grad:
        losses = torch.where(pp.valid, per_token(pp.pair, d) * coef, 0)
        return reduce(losses, reduction, denom).reshape(pp.shape if reduction == "none" else ())
    pair, rows = pp.pair, _selected(coef != 0)
    if rows is not None:
        pair, coef = _with_rows(pair, rows), coef[rows]
    if denom is not None:
        coef = coef / denom
    grad = torch.is_grad_enabled()
    ref_grad = grad and any(t is not None and t.requires_grad for t in (pair.ref.x, pair.ref.w, pair.ref.b))
    plan = PairPlan(pair.policy, pair.ref, DivergenceBlock(d, coef, want_dr=ref_grad), grad)
    return PairSinglePass.apply(*_tensors(pair), plan)[0]


@dataclass(frozen=True)
class AnchoredBlock:
    """The block function of the anchored cross-entropy: ``(sum_i l_i + sum_i coef_i D_i) /
    scale`` over the group (``l_i`` :func:`sftkey.core.loss.token_losses` on the soft-capped
    policy logits, ``D_i`` the divergence at temperature 1, ``coef`` ``[N]``), ``dz`` where
    ``with_grads``, and the statistics where ``with_stats``."""

    #: the autograd of the cross-entropy on the block holds about ten (measured: 91 MiB at 8)
    buffers: ClassVar[int] = 16

    y: Tensor
    terms: TokenTerms
    softcap: Optional[float]
    coef: Tensor
    scale: Tensor
    d: Divergence
    with_grads: bool
    with_stats: bool

    def __call__(self, group: slice, z: Tensor, r: Tensor) -> PairBlock:
        y, terms, coef = self.y[group], self.terms.select(group), self.coef[group]
        scale = self.scale.to(z.dtype)
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(self.with_grads)
            capped = leaf if self.softcap is None else self.softcap * torch.tanh(leaf / self.softcap)
            stats = _stats(capped, y, terms, self.with_stats)
            ce = token_losses(stats, y, terms).sum() / scale
            rows = self.d.rows(capped.detach().clone(), r, coef / scale if self.with_grads else None)
            loss = ce.detach() + torch.linalg.vecdot(rows.value, coef) / scale
            dz = None
            if self.with_grads:
                dz, = torch.autograd.grad(ce + torch.linalg.vecdot(capped, rows.dz).sum(), leaf)
        extra = None
        if self.with_stats:
            extra = RowStats(*(None if t is None else t.detach() for _, t in stats.items()))
        return PairBlock(loss, dz, None, extra)


def _stats(z: Tensor, y: Tensor, terms: TokenTerms, all_stats: bool) -> RowStats:
    """The statistics the loss reads from a block's logits ``z`` (all of them, with the argmax,
    where ``all_stats``), differentiable."""
    zy = z.gather(1, y.clamp_min(0)[:, None]).squeeze(1) * (y >= 0)
    S = Z = argmax = None
    if terms.reads_expected_logit or all_stats:
        S = torch.linalg.vecdot(torch.softmax(z, dim=1), z)
    if terms.reads_weighted_logit_sum or all_stats:
        Z = z.sum(dim=1) if terms.class_weights is None else z @ terms.class_weights
    if all_stats:
        argmax = z.detach().argmax(dim=1)
    top = z.detach().amax(dim=1, keepdim=True)  # lse's gradient exp(z - top) / sum: precise at large logits
    lse = top.squeeze(1) + torch.log(torch.exp(z - top).sum(dim=1))
    return RowStats(lse, zy, S, Z, argmax)


def _anchor_coef(p: Prepared, anchor_weight: float) -> Tensor:
    """``anchor_weight * a_i`` on the tokens that count, 0 elsewhere, ``[N]``."""
    valid = p.y >= 0
    a = p.terms.token_weights
    coef = valid.to(p.acc) if a is None else torch.where(valid, a, 0)
    return coef * anchor_weight


def anchored_loss(p: Prepared, ref: Head, d: Divergence, anchor_weight: float, backend) -> tuple:
    """``(loss, stats)`` of ``linear_cross_entropy`` with an anchor (stats None unless
    ``return_stats``)."""
    o = p.options
    coef = _anchor_coef(p, anchor_weight)
    denom = denominator(p.y, p.terms, o.normalizer, p.acc) if o.reduction == "mean" else None
    weights = (o.token_weights, o.entropy_weights, o.class_weights)
    weight_grads = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in weights)
    pair = Pair(p.head, ref)
    with p.autocast_off():
        if o.reduction == "none" or weight_grads:
            stats = passes.statistics(p, backend)
            losses = token_losses(stats, p.y, p.terms) + coef * per_token(pair, d)
            return reduce(losses, o.reduction, denom), stats if o.return_stats else None
        keep = contributing(p.y, p.terms) | (coef != 0)
        rows = None if o.return_stats else _selected(keep)
        y, terms = p.y, p.terms
        if rows is not None:
            pair, y, terms, coef = _with_rows(pair, rows), y[rows], terms.select(rows), coef[rows]
        scale = denom if denom is not None else torch.ones((), dtype=p.acc, device=p.y.device)
        grad = torch.is_grad_enabled()
        block_fn = AnchoredBlock(y, terms, p.head.softcap, coef, scale, d, grad, o.return_stats)
        loss, *parts = PairSinglePass.apply(*_tensors(pair), PairPlan(pair.policy, pair.ref, block_fn, grad))
        return loss, stats_of(parts) if o.return_stats else None
