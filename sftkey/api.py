"""The public functions: :func:`linear_cross_entropy`, :class:`LinearCrossEntropyLoss`,
:func:`logit_stats` and :func:`linear_divergence`. Each builds its options (:mod:`sftkey.options`), prepares its inputs
(:mod:`sftkey.core.inputs`) and hands them to the passes (:mod:`sftkey.core.passes`) on a backend."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from .backends import get_backend
from .core import compiled, pair_passes, passes, validation
from .core.inputs import pair_head, prepare, prepare_pair
from .options import DivergenceOptions, HeadOptions, LossOptions, with_options
from .results import LogitStats, LossStats

_REFERENCE_IGNORES = ("backend", "filter_eps")


@with_options(LossOptions, after="bias")
def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                         options: Optional[LossOptions] = None, **kwargs):
    """``F.cross_entropy(hidden @ weight.T + bias, targets, ...)`` with the token weighting,
    entropy, z-loss and DFT terms of docs/design.md, without the ``N x V`` logits.

    ``hidden [..., D]``, ``weight [V, D]`` (same float dtype, or any under autocast),
    ``targets [...]`` int64/int32. The options (:class:`~sftkey.options.LossOptions`, each
    documented there) are keyword arguments, or a prebuilt ``options=`` that keyword
    arguments override. Returns a float32 loss (float64 for float64 inputs): a scalar, or
    shaped like ``targets`` for ``reduction="none"``; with ``return_stats``,
    ``(loss, LossStats)``. For ``"mean"``/``"sum"``, tokens without a loss (ignored, or every
    weight zero) take no matrix products for gradients. Under ``torch.compile`` the call is
    traced without graph breaks (:mod:`sftkey.core.compiled`), except with an ``anchor``, which
    is eager only. With ``anchor=(ref_hidden, ref_weight[, ref_bias])`` (a frozen reference
    head, ``ref_hidden [..., D_ref]``, ``ref_weight [V, D_ref]``) each token's loss also takes
    ``anchor_weight * a_i * D_i`` (``anchor_kind``, docs/design.md "Two heads"), in the same
    pass over the policy logits for ``"mean"``/``"sum"``.
    """
    opts = LossOptions.build(options, kwargs, "linear_cross_entropy")
    if opts.anchor is not None:
        return _anchored(hidden, weight, targets, bias, opts)
    if torch.compiler.is_compiling() and opts.backend != "reference":
        return compiled.linear_cross_entropy(hidden, weight, targets, bias, opts)
    p = prepare(hidden, weight, targets, bias, opts, check_values=not torch.compiler.is_compiling())
    if opts.backend == "reference":
        return reference.linear_cross_entropy(hidden, weight, targets, bias=bias, **_reference_kwargs(opts))
    loss, stats = passes.loss(p, get_backend(opts.backend, p.head.x.device))
    if opts.reduction == "none":
        loss = loss.reshape(p.shape)
    return (loss, LossStats.of(stats, p.y, p.shape)) if opts.return_stats else loss


@with_options(HeadOptions, after="bias")
def logit_stats(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None, topk: int = 0,
                options: Optional[HeadOptions] = None, **kwargs) -> LogitStats:
    """Per-token statistics of the logits ``hidden @ weight.T + bias`` (docs/design.md's first
    layer), differentiable with a fused backward: any per-token loss written on them trains
    without logits. ``topk`` (0 to 32, ``MAX_TOPK``): also the ``k`` largest logits, ``[..., k]``, no gradient.
    Options: :class:`~sftkey.options.HeadOptions`."""
    opts = HeadOptions.build(options, kwargs, "logit_stats")
    if torch.compiler.is_compiling() and opts.backend != "reference":
        return compiled.logit_stats(hidden, weight, targets, bias, opts, topk)
    p = prepare(hidden, weight, targets, bias, opts, check_values=not torch.compiler.is_compiling())
    validation.check_topk(topk, p.terms.vocab_size)
    if opts.backend == "reference":
        return reference.logit_stats(hidden, weight, targets, bias=bias, topk=topk, **_reference_kwargs(opts))
    with p.autocast_off():
        stats = passes.statistics(p, get_backend(opts.backend, p.head.x.device), topk)
    return LogitStats.of(stats, p.y, p.shape)


def _anchored(hidden, weight, targets, bias, opts: LossOptions):
    """``linear_cross_entropy`` with an anchor (:func:`sftkey.core.pair_passes.anchored_loss`)."""
    if torch.compiler.is_compiling():
        raise NotImplementedError("linear_cross_entropy(anchor=...) is not traced by torch.compile yet: call it "
                                  "outside the compiled region (or compile the model body only)")
    ref_hidden, ref_weight, *rest = opts.anchor
    ref_bias = rest[0] if rest else None
    if isinstance(hidden, Tensor) and isinstance(weight, Tensor):
        validation.check_pair(hidden, weight, ref_hidden, ref_weight, ref_bias)
    p = prepare(hidden, weight, targets, bias, opts)
    if opts.backend == "reference":
        return reference.linear_cross_entropy(hidden, weight, targets, bias=bias, **_reference_kwargs(opts))
    ref = pair_head(ref_hidden.detach(), ref_weight.detach(), None if ref_bias is None else ref_bias.detach(), p.y)
    kernels = pair_passes.row_kernels(opts.backend, p.head.x, opts.anchor_kind)
    d = pair_passes.Divergence(opts.anchor_kind, opts.anchor_beta, row_kernels=kernels)
    loss, stats = pair_passes.anchored_loss(p, ref, d, opts.anchor_weight, get_backend(opts.backend, p.head.x.device))
    if opts.reduction == "none":
        loss = loss.reshape(p.shape)
    return (loss, LossStats.of(stats, p.y, p.shape)) if opts.return_stats else loss


@with_options(DivergenceOptions, after="targets")
def linear_divergence(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor,
                      targets: Optional[Tensor] = None, *, bias: Optional[Tensor] = None,
                      ref_bias: Optional[Tensor] = None, options: Optional[DivergenceOptions] = None, **kwargs):
    """The divergence between the policy head's distribution ``p = softmax((hidden @ weight.T +
    bias) / T)`` and the reference head's ``q = softmax((ref_hidden @ ref_weight.T + ref_bias)
    / T)``, token by token, weighted and reduced; neither head's ``N x V`` logits are formed.

    ``hidden [..., D]``, ``weight [V, D]``, ``ref_hidden [..., D_ref]``, ``ref_weight [V,
    D_ref]`` (one float dtype, or any under autocast; the same vocabulary ``V``), ``targets``
    ``[...]`` int64/int32 or None: only which tokens count (``ignore_index``), not the loss.
    The options (:class:`~sftkey.options.DivergenceOptions`: ``kind``, ``beta``,
    ``temperature``, ``token_weights``, ``ignore_index``, ``shift``, ``reduction``,
    ``normalizer``, ``ref_grad``, ``backend``) are keyword arguments or ``options=``.
    Returns a float32 loss (float64 for float64 inputs): a scalar, or per token for
    ``reduction="none"``. The reference gets no gradient unless ``ref_grad=True``."""
    opts = DivergenceOptions.build(options, kwargs, "linear_divergence")
    if not opts.ref_grad:
        ref_hidden, ref_weight, ref_bias = (t.detach() if isinstance(t, Tensor) else t
                                            for t in (ref_hidden, ref_weight, ref_bias))
    pp = prepare_pair(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, opts)
    if opts.backend == "reference":
        return reference.linear_divergence(hidden, weight, ref_hidden, ref_weight, targets, bias=bias,
                                           ref_bias=ref_bias, **{f.name: getattr(opts, f.name) for f in fields(opts)})
    kernels = pair_passes.row_kernels(opts.backend, pp.pair.policy.x, opts.kind)
    d = pair_passes.Divergence(opts.kind, float(opts.beta), float(opts.temperature), kernels)
    with pp.autocast_off():
        return pair_passes.divergence(pp, d, opts.reduction, opts.normalizer)


def _reference_kwargs(opts: HeadOptions) -> dict:
    return {f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in _REFERENCE_IGNORES}


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`: options at construction (``class_weights``
    is kept as a buffer, so it moves with the module), tensors per call:
    ``forward(hidden, weight, targets, bias=None, **options)``, where ``options`` override the
    module's for the call (``token_weights``, ``normalizer``, ...)."""

    def __init__(self, **options):
        super().__init__()
        opts = LossOptions.build(None, options, type(self).__name__)
        self.register_buffer("class_weights", opts.class_weights)
        self.options = replace(opts, class_weights=None)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None, **options):
        opts = LossOptions.build(replace(self.options, class_weights=self.class_weights), options, "forward")
        return linear_cross_entropy(hidden, weight, targets, bias=bias, options=opts)

    def extra_repr(self) -> str:
        """The options that differ from the defaults (tensors by shape)."""
        defaults, parts = LossOptions(), []
        for f in fields(LossOptions):
            value = getattr(self.options, f.name)
            if isinstance(value, Tensor):
                parts.append(f"{f.name}=<tensor {tuple(value.shape)}>")
            elif isinstance(value, tuple):
                parts.append(f"{f.name}=<{len(value)} tensors>")
            elif value is not None and value != getattr(defaults, f.name):
                parts.append(f"{f.name}={value!r}")
        return ", ".join(parts)


with_options(LossOptions, after="self")(LinearCrossEntropyLoss.__init__)
