"""Public API: check, flatten, shift, dispatch to a backend through the autograd Functions."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import validation
from .autograd import SinglePassFunction, StatsFunction
from .backends import get_backend
from .backends.base import Head, Stats, accumulation_dtype
from .loss import LossOptions, block_loss_fn, contributing, denominator, reduce, token_losses


class LossStats(NamedTuple):
    """Per-token statistics returned with ``return_stats=True``, each shaped like ``targets``:
    ``lse``, ``entropy``, ``target_logprob`` (0 on ignored tokens) and ``correct`` (bool:
    argmax equals the target; False on ignored tokens). Detached."""

    lse: Tensor
    entropy: Tensor
    target_logprob: Tensor
    correct: Tensor


@dataclass(frozen=True)
class LogitStats:
    """Differentiable per-token statistics of the logits, each shaped like ``targets``
    (``topk``: ``[..., k]``). ``valid`` marks the non-ignored tokens."""

    lse: Tensor
    target_logit: Tensor
    expected_logit: Tensor
    weighted_logit_sum: Tensor
    argmax: Tensor
    topk: Optional[Tensor]
    valid: Tensor

    @property
    def target_logprob(self) -> Tensor:
        """``log p_y = z_y - lse`` (0 on ignored tokens)."""
        return torch.where(self.valid, self.target_logit - self.lse, torch.zeros_like(self.lse))

    @property
    def entropy(self) -> Tensor:
        """``H = lse - sum_j p_j z_j``."""
        return self.lse - self.expected_logit


@dataclass(frozen=True)
class Prepared(Head):
    """Validated inputs, flattened to ``N`` tokens (a backend's :class:`Head`: ``x [N, D]``,
    ``w [V, D]``, ``b [V]``, ``y [N]`` int64 with ``-1`` = ignored, ``c [V]``), and the loss's
    options, weights in the accumulation dtype (float64 for float64 inputs, else float32)."""

    opts: LossOptions
    shape: torch.Size
    device_type: str

    @property
    def acc(self) -> torch.dtype:
        """The accumulation dtype: float64 for float64 inputs, else float32."""
        return accumulation_dtype(self.x.dtype)

    def autocast_off(self):
        """Keep an enclosing ``torch.autocast`` from re-casting the backends' products."""
        if validation.autocast_enabled(self.device_type):
            return torch.autocast(self.device_type, enabled=False)
        return contextlib.nullcontext()


def _shift(t: Tensor, fill) -> Tensor:
    """Position ``t`` takes the entry of ``t + 1``; the last position gets ``fill``."""
    return torch.cat([t[..., 1:], torch.full_like(t[..., :1], fill)], dim=-1)


def flat_targets(targets: Tensor, ignore_index: int, shift: bool) -> Tensor:
    """``targets`` shifted (if ``shift``) and flattened to int64 ``[N]``, ``-1`` where ignored."""
    if shift:
        targets = _shift(targets, ignore_index)
    return torch.where(targets == ignore_index, -1, targets).reshape(-1).long()


def flat_weights(weights, shift: bool, dtype: torch.dtype):
    """Per-token weights indexed like ``targets``, shifted with them and flattened to ``[N]``
    in ``dtype``; a scalar (tensor or number) or None passes through."""
    if not isinstance(weights, Tensor) or weights.dim() == 0:
        return weights.to(dtype) if isinstance(weights, Tensor) else weights
    return (_shift(weights, 0) if shift else weights).reshape(-1).to(dtype)


def _autocast(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast to the autocast dtype exactly as ``F.linear`` would; gradients flow back in the
    inputs' own dtypes."""
    device_type = hidden.device.type
    if not validation.autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


def prepare(hidden, weight, targets, *, bias=None, token_weights=None, entropy_weights=None,
            class_weights=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
            dft=False, reduction="mean", normalizer=None, shift=False, backend="auto",
            filter_eps=None, topk=0, vocab_size=None) -> Prepared:
    """Check every argument, apply autocast and ``shift``, flatten to ``N`` tokens.

    ``vocab_size``: the vocabulary that ``targets`` and ``class_weights`` index, when
    ``weight`` holds only a shard of it (:mod:`sftkey.distributed`); default ``weight``'s rows."""
    autocast = isinstance(hidden, Tensor) and validation.autocast_enabled(hidden.device.type)
    validation.check_head(hidden, weight, targets, bias, autocast=autocast)
    V = weight.shape[0] if vocab_size is None else vocab_size
    validation.check_options(
        targets, V, token_weights=token_weights, entropy_weights=entropy_weights,
        class_weights=class_weights, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, dft=dft, reduction=reduction, normalizer=normalizer, shift=shift,
        backend=backend, filter_eps=filter_eps, topk=topk)
    validation.check_targets_range(targets, V, ignore_index)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    acc = accumulation_dtype(hidden.dtype)
    c = None if class_weights is None else class_weights.to(acc)
    opts = LossOptions(
        vocab_size=V, token_weights=flat_weights(token_weights, shift, acc),
        entropy_weights=flat_weights(entropy_weights, shift, acc), class_weights=c,
        label_smoothing=float(label_smoothing), z_loss=float(z_loss), dft=bool(dft))
    return Prepared(
        x=hidden.reshape(-1, hidden.shape[-1]).contiguous(), w=weight.contiguous(),
        b=None if bias is None else bias.contiguous(), y=flat_targets(targets, ignore_index, shift), c=c,
        softcap=None if softcap is None else float(softcap), opts=opts, shape=targets.shape,
        device_type=hidden.device.type)


def loss_stats(stats: Stats, y: Tensor, shape: torch.Size) -> LossStats:
    """The ``return_stats`` view of backend statistics."""
    valid = y >= 0
    lse = stats.lse.detach()
    logp = torch.where(valid, stats.target_logit.detach() - lse, torch.zeros_like(lse))
    return LossStats(lse.reshape(shape), (lse - stats.expected_logit.detach()).reshape(shape),
                     logp.reshape(shape), ((stats.argmax == y) & valid).reshape(shape))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                         token_weights: Optional[Tensor] = None,
                         entropy_weights: Union[Tensor, float, None] = None,
                         class_weights: Optional[Tensor] = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, dft: bool = False, reduction: str = "mean",
                         normalizer: Union[Tensor, float, None] = None, shift: bool = False,
                         return_stats: bool = False, backend: str = "auto",
                         filter_eps: Optional[float] = None):
    """``F.cross_entropy(hidden @ weight.T + bias, targets, ...)`` and DESIGN.md's token
    weighting, entropy, z-loss and DFT terms, without the ``N x V`` logits.

    ``hidden [..., D]``, ``weight [V, D]`` (same float dtype, or any under autocast),
    ``targets [...]`` int64/int32. Returns a float32 loss (float64 for float64 inputs):
    a scalar, or shaped like ``targets`` for ``reduction="none"``; with ``return_stats``,
    ``(loss, LossStats)``. ``filter_eps``: skip gradient tiles whose probabilities are all
    below it (triton backend; None, the default, is exact). For ``"mean"``/``"sum"``, tokens
    without a loss (ignored, or every weight zero) take no matrix products for gradients.
    """
    options = dict(bias=bias, token_weights=token_weights, entropy_weights=entropy_weights,
                   class_weights=class_weights, ignore_index=ignore_index, label_smoothing=label_smoothing,
                   z_loss=z_loss, softcap=softcap, dft=dft, reduction=reduction, normalizer=normalizer,
                   shift=shift, return_stats=return_stats, filter_eps=filter_eps)
    if backend == "reference":
        from . import reference
        return reference.linear_cross_entropy(hidden, weight, targets, **options)
    del options["return_stats"]
    p = prepare(hidden, weight, targets, backend=backend, **options)
    be = get_backend(backend, p.x.device)
    opts = p.opts
    weight_tensors = [t for t in (opts.token_weights, opts.entropy_weights, opts.class_weights) if isinstance(t, Tensor)]
    single_pass = reduction != "none" and not (torch.is_grad_enabled() and any(t.requires_grad for t in weight_tensors))
    denom = denominator(p.y, opts, normalizer, p.acc) if reduction == "mean" else None
    with p.autocast_off():
        if single_pass:
            scale = denom if denom is not None else torch.ones((), dtype=p.acc, device=p.y.device)
            loss, stats = _single_pass(p, be, filter_eps, scale, return_stats)
        else:
            stats = Stats(*StatsFunction.apply(p.x, p.w, p.b, p.y, p.c, p.softcap, 0, be, filter_eps)[:5])
            loss = reduce(token_losses(stats, p.y, opts), reduction, denom)
    if reduction == "none":
        loss = loss.reshape(p.shape)
    return (loss, loss_stats(stats, p.y, p.shape)) if return_stats else loss


def _single_pass(p: Prepared, be, filter_eps, scale: Tensor, return_stats: bool):
    """The scalar loss ``sum_i l_i / scale`` and its statistics by the single pass (DESIGN.md),
    its gradients formed where grad mode is on. Only the tokens that contribute to the loss go
    through it (SFT's ignored prompt tokens cost no gradient work); with ``return_stats`` the
    others get their statistics from a forward pass over their rows alone (``2NDV`` there)."""
    y, opts, rows = p.y, p.opts, None
    keep = contributing(y, opts)
    skip = 0 < int(keep.sum()) < keep.numel()
    if skip:
        rows = keep.nonzero().squeeze(1)
        y, opts = y[rows], opts.rows(rows)
    wanted = (opts.uses_expected_logit or return_stats, opts.uses_weighted_logit_sum, return_stats)
    grad = torch.is_grad_enabled()
    loss, *parts = SinglePassFunction.apply(p.x, p.w, p.b, y, p.c, p.softcap, 0, be, filter_eps,
                                            block_loss_fn(y, opts, scale, grad), wanted, grad, rows)
    stats = Stats(*parts[:5])
    if return_stats and skip:
        stats = _with_skipped(stats, p, keep, be)
    return loss, stats


def _with_skipped(stats: Stats, p: Prepared, keep: Tensor, be) -> Stats:
    """Every token's statistics: ``stats`` for the tokens where ``keep``, a forward pass's for the others."""
    skipped = (~keep).nonzero().squeeze(1)
    with torch.no_grad():
        rest = be.forward(Head(p.x.detach()[skipped], p.w.detach(), None if p.b is None else p.b.detach(),
                               p.y[skipped], p.c, p.softcap))
    merged = []
    for kept_part, skipped_part in zip(stats[:5], rest[:5]):
        if kept_part.numel() == 0:  # a statistic the single pass was told nobody reads
            merged.append(kept_part)
            continue
        full = skipped_part.new_empty(keep.shape)
        full[keep], full[skipped] = kept_part, skipped_part
        merged.append(full)
    return Stats(*merged)


def logit_stats(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                class_weights: Optional[Tensor] = None, softcap: Optional[float] = None,
                ignore_index: int = -100, topk: int = 0, backend: str = "auto",
                filter_eps: Optional[float] = None) -> LogitStats:
    """Per-token statistics of the logits ``hidden @ weight.T + bias`` (DESIGN.md's first layer),
    differentiable with a fused backward: any per-token loss written on them trains without
    logits. ``topk`` (0 to 8): also the ``k`` largest logits, ``[..., k]``, no gradient."""
    if backend == "reference":
        from . import reference
        return reference.logit_stats(hidden, weight, targets, bias=bias, class_weights=class_weights,
                                     softcap=softcap, ignore_index=ignore_index, topk=topk)
    p = prepare(hidden, weight, targets, bias=bias, class_weights=class_weights, softcap=softcap,
                ignore_index=ignore_index, backend=backend, filter_eps=filter_eps, topk=topk)
    be = get_backend(backend, p.x.device)
    with p.autocast_off():
        lse, zy, S, Z, argmax, top = StatsFunction.apply(p.x, p.w, p.b, p.y, p.c, p.softcap, topk, be, filter_eps)
    return shape_stats(Stats(lse, zy, S, Z, argmax, top if topk else None), p)


def shape_stats(stats: Stats, p: Prepared) -> LogitStats:
    """Backend statistics reshaped like the targets."""
    shape = p.shape
    top = None if stats.topk is None else stats.topk.reshape(*shape, -1)
    return LogitStats(*(t.reshape(shape) for t in stats[:5]), top, (p.y >= 0).reshape(shape))


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`: options at construction (``class_weights``
    is kept as a buffer), tensors per call: ``forward(hidden, weight, targets, bias=None,
    token_weights=None, entropy_weights=None, normalizer=None)``."""

    def __init__(self, *, class_weights: Optional[Tensor] = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                 dft: bool = False, reduction: str = "mean", shift: bool = False,
                 entropy_weights: Optional[float] = None, return_stats: bool = False,
                 backend: str = "auto", filter_eps: Optional[float] = None):
        super().__init__()
        self.register_buffer("class_weights", class_weights)
        self.options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                            softcap=softcap, dft=dft, reduction=reduction, shift=shift,
                            return_stats=return_stats, backend=backend, filter_eps=filter_eps)
        self.entropy_weights = entropy_weights

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                token_weights: Optional[Tensor] = None, entropy_weights=None, normalizer=None):
        if entropy_weights is None:
            entropy_weights = self.entropy_weights
        return linear_cross_entropy(hidden, weight, targets, bias=bias, token_weights=token_weights,
                                    entropy_weights=entropy_weights, class_weights=self.class_weights,
                                    normalizer=normalizer, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
