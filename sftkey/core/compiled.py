"""The public functions under ``torch.compile``: the eager passes behind three custom ops, so
that Dynamo traces a call without graph breaks (``fullgraph=True`` works) and without
reading any data on the host.

* ``sftkey::scalar_loss``: a ``"mean"``/``"sum"`` call whole (checks, row selection, the
  single pass), returning the loss, the gradients it formed and the statistics; its
  backward scales the gradients by the upstream one, as the eager single pass does. Its
  schema lists :class:`~sftkey.options.LossOptions`' fields as the declaration types them
  (:data:`_LOSS_OPTIONS`): the options are flattened into the op's arguments and made again
  inside it.
* ``sftkey::row_stats`` and ``sftkey::row_stats_backward``: the statistics of every token
  and their recompute backward, for ``reduction="none"`` and ``logit_stats``; the
  per-token loss on them is traced as plain PyTorch.

The checks that read the targets' values run inside the ops, on the real data; the others
are traced. Under ``torch.compile`` the backend is given by name.
"""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import fields
from typing import Optional

import torch
from torch import Tensor

from ..backends.engine import Head, Needs, RowStats, StatGrads
from ..options import HeadOptions, LossOptions
from ..results import LogitStats, LossStats
from . import driver
from .inputs import check_topk, check_values_of, prepare
from .loss import token_losses


@contextmanager
def _autograd_within_op():
    """Autograd back on inside a custom op's implementation (which the dispatcher runs below
    autograd, with grad mode off): the eager passes take the loss's gradients block by block."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in dir(keys):
        if name.startswith("Autograd"):
            exclude = exclude.remove(getattr(keys, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _or_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 else t


def _backend(opts: HeadOptions) -> str:
    if not isinstance(opts.backend, str):
        raise TypeError("backend: under torch.compile, pass the backend by name, not as an instance")
    return opts.backend


# ---- sftkey::scalar_loss ------------------------------------------------------------------

#: The options passed to the op, with their schema types (the anchor has none: eager only).
_LOSS_OPTIONS = tuple((f.name, f.metadata["schema"]) for f in fields(LossOptions) if f.metadata["schema"])


def _flattened(opts: LossOptions, like: Tensor) -> list:
    """The op's option arguments: a number where the schema takes a tensor becomes a 0-d float64 one."""
    values = []
    for name, schema in _LOSS_OPTIONS:
        value = _backend(opts) if name == "backend" else getattr(opts, name)
        if schema.startswith("Tensor") and value is not None and not isinstance(value, Tensor):
            value = torch.tensor(float(value), dtype=torch.float64, device=like.device)
        values.append(value)
    return values


def _scalar_loss_impl(hidden, weight, targets, bias, *args):
    """``(loss, dx, dw, db, lse, entropy, target_logprob, correct, predicted)``; empty where not formed."""
    *values, needs = args
    opts = LossOptions(**dict(zip((name for name, _ in _LOSS_OPTIONS), values)))
    leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip((hidden, weight, bias), needs)]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with _autograd_within_op() if wanted else contextlib.nullcontext():
        p = prepare(leaves[0], leaves[1], targets, leaves[2], opts)
        loss, stats = driver.loss(p, driver.resolve_backend(opts.backend, p.head.x.device, p.head.x.dtype))
        grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    dx, dw, db = (next(grads) if t is not None and t.requires_grad else _empty(hidden) for t in leaves)
    view = LossStats.of(stats, p.y, p.shape) if opts.return_stats else None
    out = ((view.lse, view.entropy, view.target_logprob, view.correct, view.predicted) if view
           else [_empty(hidden) for _ in range(5)])
    return (loss.detach(), dx, dw, db, *out)


def _scalar_loss_fake(hidden, weight, targets, bias, *args):
    *values, needs = args
    return_stats = values[[name for name, _ in _LOSS_OPTIONS].index("return_stats")]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grads = [torch.empty_like(t) if t is not None and need else _empty(hidden)
             for t, need in zip((hidden, weight, bias), needs)]
    stats = ([targets.new_empty(targets.shape, dtype=acc) for _ in range(3)]
             + [targets.new_empty(targets.shape, dtype=torch.bool), targets.new_empty(targets.shape, dtype=torch.int64)]
             if return_stats else [_empty(hidden) for _ in range(5)])
    return (hidden.new_empty((), dtype=acc), *grads, *stats)


def _scalar_loss_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:4])


def _scalar_loss_backward(ctx, g_loss, *_):
    dx, dw, db = (None if g.numel() == 0 else g * g_loss.to(g.dtype) for g in ctx.saved_tensors)
    return (dx, dw, None, db, *([None] * len(_LOSS_OPTIONS)), None)


_scalar_loss = torch.library.custom_op(
    "sftkey::scalar_loss", _scalar_loss_impl, mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
           + "".join(f"{schema} {name}, " for name, schema in _LOSS_OPTIONS)
           + "bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_scalar_loss.register_fake(_scalar_loss_fake)
_scalar_loss.register_autograd(_scalar_loss_backward, setup_context=_scalar_loss_context)


# ---- sftkey::row_stats, sftkey::row_stats_backward -----------------------------------------

def _head(x, w, b, y, c, softcap) -> Head:
    return Head(x, w, b, y, c, softcap)


def _resolved(backend: str, x: Tensor):
    return driver.resolve_backend(backend, x.device, x.dtype)


@torch.library.custom_op("sftkey::row_stats", mutates_args=())
def _row_stats(x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, c: Optional[Tensor], softcap: Optional[float],
               backend: str, topk: int, filter_eps: Optional[float], targets: Tensor, vocab_size: int,
               ignore_index: int, token_weights: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(lse, target_logit, expected_logit, weighted_logit_sum, argmax, topk)`` of the flattened
    head; first the checks of the values that the traced call leaves out."""
    check_values_of(targets, vocab_size, ignore_index, token_weights)
    stats = _resolved(backend, x).forward(_head(x, w, b, y, c, softcap), topk)
    return (stats.lse, stats.target_logit, stats.expected_logit, stats.weighted_logit_sum, stats.argmax,
            stats.topk if topk else _empty(stats.lse))


@_row_stats.register_fake
def _(x, w, b, y, c, softcap, backend, topk, filter_eps, targets, vocab_size, ignore_index, token_weights):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = y.shape[0]
    return (*(x.new_empty(n, dtype=acc) for _ in range(4)), y.new_empty(n), x.new_empty((n, topk) if topk else 0, dtype=acc))


@torch.library.custom_op("sftkey::row_stats_backward", mutates_args=())
def _row_stats_backward(x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, c: Optional[Tensor],
                        softcap: Optional[float], backend: str, filter_eps: Optional[float], lse: Tensor, S: Tensor,
                        g_lse: Optional[Tensor], g_zy: Optional[Tensor], g_S: Optional[Tensor],
                        g_Z: Optional[Tensor], needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)`` for the statistics' upstream gradients; empty where not needed."""
    grads = StatGrads(*(None if g is None else g.to(lse.dtype).contiguous() for g in (g_lse, g_zy, g_S, g_Z)))
    out = _resolved(backend, x).backward(_head(x, w, b, y, c, softcap), RowStats(lse, None, S), grads,
                                         Needs(*needs), filter_eps)
    return tuple(_empty(x) if g is None else g for g in out)


@_row_stats_backward.register_fake
def _(x, w, b, y, c, softcap, backend, filter_eps, lse, S, g_lse, g_zy, g_S, g_Z, needs):
    return tuple(torch.empty_like(t) if t is not None and need else _empty(x) for t, need in zip((x, w, b), needs))


def _row_stats_context(ctx, inputs, output):
    x, w, b, y, c, softcap, backend, _topk, filter_eps, *_ = inputs
    ctx.save_for_backward(x, w, b, y, c, output[0], output[2])
    ctx.softcap, ctx.backend, ctx.filter_eps = softcap, backend, filter_eps


def _row_stats_grad(ctx, g_lse, g_zy, g_S, g_Z, _g_argmax, _g_topk):
    x, w, b, y, c, lse, S = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]]
    dx, dw, db = _row_stats_backward(x, w, b, y, c, ctx.softcap, ctx.backend, ctx.filter_eps, lse, S,
                                     g_lse, g_zy, g_S, g_Z, needs)
    return (_or_none(dx), _or_none(dw), _or_none(db), *([None] * 10))


_row_stats.register_autograd(_row_stats_grad, setup_context=_row_stats_context)


def _statistics(p, targets: Tensor, opts: HeadOptions, topk: int = 0) -> RowStats:
    h = p.head
    out = _row_stats(h.x, h.w, h.b, h.y, h.c, h.softcap, _backend(opts), topk, opts.filter_eps, targets,
                     p.terms.vocab_size, opts.ignore_index, getattr(opts, "token_weights", None))
    return RowStats(*out[:5], topk=out[5] if topk else None)


# ---- the public functions ----------------------------------------------------------------

def linear_cross_entropy(hidden, weight, targets, bias, opts: LossOptions):
    """:func:`sftkey.linear_cross_entropy` while Dynamo traces it."""
    if opts.reduction == "none":
        p = prepare(hidden, weight, targets, bias, opts, check_values=False)
        with p.autocast_off():
            stats = _statistics(p, targets, opts)
            loss = token_losses(stats, p.y, p.terms).reshape(p.shape)
        return (loss, LossStats.of(stats, p.y, p.shape)) if opts.return_stats else loss
    grad = torch.is_grad_enabled()
    needs = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, _, _, _, *stats = _scalar_loss(hidden, weight, targets, bias, *_flattened(opts, hidden), needs)
    return (loss, LossStats(*stats)) if opts.return_stats else loss


def logit_stats(hidden, weight, targets, bias, opts: HeadOptions, topk: int) -> LogitStats:
    """:func:`sftkey.logit_stats` while Dynamo traces it."""
    p = prepare(hidden, weight, targets, bias, opts, check_values=False)
    check_topk(topk, p.terms.vocab_size)
    with p.autocast_off():
        return LogitStats.of(_statistics(p, targets, opts, topk), p.y, p.shape)
