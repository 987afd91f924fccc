"""The driver: each public operation's pass is decided here, once per call, and runs through
one pair of autograd Functions over one or two heads (docs/design.md, "Passes").

The decisions, in order:

1. **The backend** (:func:`resolve_backend`): ``"auto"`` is resolved here and nowhere else.
2. **The denominator** of ``"mean"``: ``sum_i a_i c_{y_i}`` over the tokens that count
   (:func:`sftkey.core.loss.denominator`; ``sum_i a_i`` for a divergence), or the ``normalizer``.
3. **Per token or single pass.** ``reduction="none"``, or a weight tensor that needs a
   gradient, takes the per-token path: every token's statistics (or divergence) through
   :class:`Recompute`, whose backward recomputes the logits (``8NDV``), then the loss in
   PyTorch. A scalar reduction takes :class:`SinglePass`: the backend forms the gradients
   during the forward from the loss block by block (``6NDV``).
4. **The tokens of a single pass**: only those with a loss (:func:`sftkey.core.loss.contributing`,
   or an anchor or divergence coefficient); with ``return_stats`` the others' statistics come
   from a forward over their rows alone, without gradients.

A plan (:class:`OnePlan` for one head, :class:`PairPlan` for a policy and a reference head)
tells the two Functions how to run the backend; they take ``(plan, x, w, b[, x_ref, w_ref,
b_ref])`` and return a :class:`~sftkey.backends.engine.RowStats`'s tensors in field order.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional, Union

import torch
from torch import Tensor

from ..backends import REGISTRY
from ..backends.engine import (NO_GRADS, Backend, BlockLoss, BlockFn, Head, Needs, Pair, Reads, RowStats, StatGrads)
from .divergence import AnchoredBlock, Divergence, DivergenceBlock
from .inputs import Prepared
from .loss import TokenBlockLoss, contributing, denominator, reduce, token_losses

# ---- the backend ------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _load(name: str) -> Backend:
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def triton_usable(device: torch.device) -> bool:
    """Whether the triton backends can run on ``device``: Triton imports, and the kernels have
    launch settings there (a CUDA GPU of a generation in :mod:`sftkey.kernels.configs`, or the
    CPU under the interpreter)."""
    try:
        from sftkey.kernels.configs import known_gpu

        return _load("triton").available(device) and known_gpu(device)
    except ImportError:
        return False


def resolve_backend(backend: Union[str, Backend], device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend called ``backend``, or ``backend`` itself when it is an instance. ``"auto"``:
    the triton backend on a CUDA device where it is usable for ``dtype`` inputs and a record
    says it passed the GPU check on that GPU generation with this Triton and torch
    (:func:`sftkey.kernels.configs.verified`), else torch (said once per device on CUDA). A
    ``ValueError`` where the backend cannot run on ``device``."""
    if isinstance(backend, Backend):
        chosen = backend
    elif backend == "auto":
        return _load("triton" if device.type == "cuda" and _auto_triton(device, dtype) else "torch")
    else:
        chosen = _load(backend)
    if not chosen.available(device):
        raise ValueError(f"backend={chosen.name!r} cannot run on device {device}")
    return chosen


def _auto_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``"auto"`` takes the triton backend on the CUDA ``device`` for ``dtype`` inputs."""
    from sftkey.kernels.configs import KERNEL_DTYPES

    if dtype not in KERNEL_DTYPES:
        return False
    return _verified_triton(torch.device(device.type, torch.cuda.current_device() if device.index is None
                                         else device.index))


@lru_cache(maxsize=None)
def _verified_triton(device: torch.device) -> bool:
    """Whether the triton backend is usable and verified on ``device``; where not, a warning once."""
    if not triton_usable(device):
        why = "Triton is not installed or has no launch settings for this GPU generation"
    else:
        from sftkey.kernels.configs import PATHS, RECORDS, verified

        if all(verified(device, path) for path in PATHS):
            return True
        why = f"no record in {RECORDS.name} says its kernels passed scripts/gpu-check.sh on this GPU generation"
    warnings.warn(f"sftkey: backend='auto' runs the torch backend on {torch.cuda.get_device_name(device)}: {why}; "
                  "pass backend='triton' to run the Triton kernels anyway", RuntimeWarning, stacklevel=5)
    return False


# ---- the operations ---------------------------------------------------------------------------

def _weights_need_grad(options) -> bool:
    """Whether a weight tensor of the options (per token, or the class weights) needs a gradient."""
    names = (*options.per_token(), "class_weights")
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (getattr(options, n, None) for n in names))


def _selected(keep: Tensor) -> Optional[Tensor]:
    """The indices of the tokens where ``keep``, or None where that is every token or none
    (then every token goes, those without a loss contributing zero)."""
    count = int(keep.sum())
    return keep.nonzero().squeeze(1) if 0 < count < keep.numel() else None


def statistics(p: Prepared, backend: Backend, topk: int = 0) -> RowStats:
    """Every token's statistics of the policy head, differentiable (:func:`sftkey.logit_stats`)."""
    plan = OnePlan(p.head, backend, filter_eps=getattr(p.options, "filter_eps", None), topk=topk)
    return stats_of(Recompute.apply(plan, *_tensors(p.head)))


def loss(p: Prepared, backend: Backend) -> tuple:
    """``(loss, stats)`` of :func:`sftkey.linear_cross_entropy`, with its anchor where ``p.ref``:
    the loss reduced as ``p.options`` says (float32, or float64 for float64 inputs), and every
    token's statistics where ``return_stats`` (else None)."""
    o = p.options
    denom = denominator(p.y, p.terms, o.normalizer, p.acc) if o.reduction == "mean" else None
    d = coef = None
    if p.ref is not None:
        d = Divergence(o.anchor_kind, float(o.anchor_beta),
                       kernel_rows=backend.two_head_rows(o.anchor_kind, p.head.x.dtype, p.head.x.device))
        coef = _token_coef(p) * o.anchor_weight
    with p.autocast_off():
        if o.reduction == "none" or _weights_need_grad(o):
            stats = statistics(p, backend)
            losses = token_losses(stats, p.y, p.terms)
            if d is not None:
                losses = losses + coef * _per_token_divergence(p.pair, d, backend)
            return reduce(losses, o.reduction, denom), stats if o.return_stats else None
        keep = contributing(p.y, p.terms) if d is None else contributing(p.y, p.terms) | (coef != 0)
        rows = _selected(keep)
        y, terms = p.y, p.terms
        if rows is not None:
            y, terms = y[rows], terms.select(rows)
            coef = None if coef is None else coef[rows]
        scale = denom if denom is not None else torch.ones((), dtype=p.acc, device=p.y.device)
        grad = torch.is_grad_enabled()
        if d is None:
            head = p.head if rows is None else p.head.selected(rows)
            reads = Reads(terms.reads_expected_logit or o.return_stats, terms.reads_weighted_logit_sum, o.return_stats)
            plan = OnePlan(head, backend, o.filter_eps, block_loss=TokenBlockLoss(y, terms, scale, grad), reads=reads,
                           grad_enabled=grad)
        else:
            pair = p.pair if rows is None else p.pair.selected(rows)
            block_fn = AnchoredBlock(y, terms, p.head.softcap, coef, scale, d, grad, o.return_stats)
            plan = PairPlan(pair, backend, block_fn, grad)
        total, *parts = SinglePass.apply(plan, *plan.tensors())
        if not o.return_stats:
            return total, None
        stats = stats_of(parts)
        if rows is not None:
            stats = RowStats.interleave(keep, stats, _forward_only(p.head.selected((~keep).nonzero().squeeze(1)),
                                                                   backend))
        return total, stats


def divergence(p: Prepared, backend: Backend) -> Tensor:
    """:func:`sftkey.linear_divergence`'s loss: ``sum_i a_i D_i`` over the tokens that count,
    reduced as ``p.options`` says (``"mean"``: over ``sum_i a_i``, or ``normalizer``)."""
    o = p.options
    x = p.head.x
    d = Divergence(o.kind, float(o.beta), float(o.temperature), backend.two_head_rows(o.kind, x.dtype, x.device))
    valid, coef = p.y >= 0, _token_coef(p)
    denom = denominator(p.y, p.terms, o.normalizer, p.acc) if o.reduction == "mean" else None
    with p.autocast_off():
        if o.reduction == "none" or _weights_need_grad(o):
            losses = torch.where(valid, _per_token_divergence(p.pair, d, backend) * coef, 0)
            return reduce(losses, o.reduction, denom).reshape(p.shape if o.reduction == "none" else ())
        pair, rows = p.pair, _selected(coef != 0)
        if rows is not None:
            pair, coef = pair.selected(rows), coef[rows]
        if denom is not None:
            coef = coef / denom
        grad = torch.is_grad_enabled()
        ref_grad = grad and any(t is not None and t.requires_grad for t in _tensors(pair.ref))
        plan = PairPlan(pair, backend, DivergenceBlock(d, coef, want_dr=ref_grad), grad)
        return SinglePass.apply(plan, *plan.tensors())[0]


def _token_coef(p: Prepared) -> Tensor:
    """Each token's weight in a two-head term: ``a_i`` (1 without token weights), 0 where ignored."""
    valid, a = p.y >= 0, p.terms.token_weights
    return valid.to(p.acc) if a is None else torch.where(valid, a, 0)


def _per_token_divergence(pair: Pair, d: Divergence, backend: Backend) -> Tensor:
    """``D_i`` of every token of ``pair``, differentiable (the per-token path; the policy's
    logits soft-capped with its head's ``softcap``, as an anchored loss's are)."""
    plan = PairPlan(pair, backend, DivergenceBlock(d, softcap=pair.policy.softcap))
    return Recompute.apply(plan, *plan.tensors())[0]


def _forward_only(head: Head, backend: Backend) -> RowStats:
    """The statistics of ``head``'s tokens, without gradients."""
    with torch.no_grad():
        return backend.forward(replace(head, x=head.x.detach(), w=head.w.detach(),
                                       b=None if head.b is None else head.b.detach()))


# ---- the plans and the two Functions ----------------------------------------------------------

def _tensors(head: Head) -> tuple:
    return head.x, head.w, head.b


def _needs(ctx, tensors: tuple, enabled: bool = True) -> list:
    """Per head, which of its ``(x, w, b)`` get a gradient (``ctx.needs_input_grad[0]`` is the plan's)."""
    n = ctx.needs_input_grad[1:]
    if not enabled:
        return [NO_GRADS] * (len(tensors) // 3)
    return [Needs(n[i], n[i + 1], tensors[i + 2] is not None and n[i + 2]) for i in range(0, len(tensors), 3)]


@dataclass(frozen=True)
class OnePlan:
    """One head's pass: the head (its ``x, w, b`` replaced by the Function's inputs), the
    backend, and for a single pass the loss block by block, the statistics it reads and the
    caller's grad mode (off: the loss alone); for the per-token path the top-k to return."""

    head: Head
    backend: Backend
    filter_eps: Optional[float] = None
    block_loss: Optional[BlockLoss] = None
    reads: Reads = Reads()
    grad_enabled: bool = True
    topk: int = 0

    def tensors(self) -> tuple:
        return _tensors(self.head)

    def at(self, x, w, b) -> Head:
        return replace(self.head, x=x, w=w, b=b)

    def single_pass(self, tensors: tuple, needs: list) -> tuple:
        result = self.backend.single_pass(self.at(*tensors), self.block_loss, needs[0], self.reads, self.filter_eps)
        return result.loss, result.stats, (result.dx, result.dw, result.db)

    def per_token(self, tensors: tuple) -> tuple:
        """``(outputs, non-differentiable outputs, what the backward keeps)``."""
        stats = self.backend.forward(self.at(*tensors), self.topk)
        out = outputs(stats)
        return out, out[4:], (stats.lse, stats.expected_logit)

    def backward(self, tensors: tuple, kept: tuple, upstream: tuple, needs: list) -> tuple:
        lse, S = kept
        grads = StatGrads(*(None if g is None else g.to(lse.dtype).contiguous() for g in upstream[:4]))
        return self.backend.backward(self.at(*tensors), RowStats(lse, None, S), grads, needs[0], self.filter_eps)


@dataclass(frozen=True)
class PairPlan:
    """A policy and a reference head's pass through :meth:`~sftkey.backends.engine.Backend.pair_pass`:
    the heads, the backend, the block function, and the caller's grad mode."""

    pair: Pair
    backend: Backend
    block_fn: BlockFn
    grad_enabled: bool = True

    def tensors(self) -> tuple:
        return (*_tensors(self.pair.policy), *_tensors(self.pair.ref))

    def at(self, x, w, b, xr, wr, br) -> Pair:
        return Pair(replace(self.pair.policy, x=x, w=w, b=b), replace(self.pair.ref, x=xr, w=wr, b=br))

    def single_pass(self, tensors: tuple, needs: list) -> tuple:
        result = self.backend.pair_pass(self.at(*tensors), self.block_fn, *needs)
        extras = [block.extra for block in result.blocks if block.extra is not None]
        return (sum(block.loss for block in result.blocks), RowStats.cat(extras) if extras else None,
                (*result.policy_grads, *result.ref_grads))

    def per_token(self, tensors: tuple) -> tuple:
        result = self.backend.pair_pass(self.at(*tensors), self.block_fn, NO_GRADS, NO_GRADS)
        return (torch.cat([block.loss for block in result.blocks]),), (), ()

    def backward(self, tensors: tuple, kept: tuple, upstream: tuple, needs: list) -> tuple:
        if upstream[0] is None:  # D unused: no gradient
            return (None,) * len(tensors)
        block_fn = replace(self.block_fn, coef=upstream[0].contiguous(), want_dz=any(needs[0]), want_dr=any(needs[1]))
        result = self.backend.pair_pass(self.at(*tensors), block_fn, *needs)
        return (*result.policy_grads, *result.ref_grads)


class SinglePass(torch.autograd.Function):
    """``(plan, *tensors) -> (loss, *RowStats)`` for a scalar loss: the backend forms the
    gradients during the forward; the backward scales them by the upstream gradient. The
    statistics (where the pass returns any) are detached."""

    @staticmethod
    def forward(ctx, plan, *tensors):
        result_loss, stats, grads = plan.single_pass(tensors, _needs(ctx, tensors, plan.grad_enabled))
        ctx.save_for_backward(*grads)
        out = outputs(stats) if stats is not None else ()
        ctx.mark_non_differentiable(*out)
        x = tensors[0]
        dtype = stats.lse.dtype if stats is not None else None
        return (torch.as_tensor(result_loss, dtype=dtype, device=x.device), *out)

    @staticmethod
    def backward(ctx, g_loss, *_):
        return (None, *scaled(ctx.saved_tensors, g_loss))


class Recompute(torch.autograd.Function):
    """``(plan, *tensors) -> per-token outputs`` (one head's statistics, or two heads' ``D_i``);
    the backward recomputes the logits and takes one upstream gradient per output."""

    @staticmethod
    def forward(ctx, plan, *tensors):
        out, constant, kept = plan.per_token(tensors)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        ctx.save_for_backward(*tensors, *kept)
        ctx.plan, ctx.count = plan, len(tensors)
        ctx.mark_non_differentiable(*constant)
        return out

    @staticmethod
    def backward(ctx, *upstream):
        saved = ctx.saved_tensors
        tensors, kept = saved[: ctx.count], saved[ctx.count:]
        return (None, *ctx.plan.backward(tensors, kept, upstream, _needs(ctx, tensors)))


_FIELDS = tuple(RowStats.__dataclass_fields__)


def outputs(stats: RowStats) -> tuple:
    """``stats`` as a Function's outputs: its tensors in field order, empty for a None."""
    empty = stats.lse.new_empty(0)
    return tuple(empty if t is None else t for _, t in stats.items())


def stats_of(tensors) -> RowStats:
    """The :class:`RowStats` of a Function's outputs (an empty optional statistic back to None)."""
    values = dict(zip(_FIELDS, tensors))
    return RowStats(**{k: None if v.numel() == 0 and k not in _FIELDS[:2] else v for k, v in values.items()})


def scaled(grads, g_loss: Tensor) -> tuple:
    """The gradients a single pass formed in its forward, times the upstream gradient of the
    loss (as they are where that is 1 on the CPU: no multiply, no copy)."""
    if g_loss.device.type == "cpu" and float(g_loss) == 1.0:
        return tuple(grads)
    return tuple(None if g is None else g * g_loss.to(g.dtype) for g in grads)
