"""The public functions: :func:`linear_cross_entropy`, :class:`LinearCrossEntropyLoss`,
:func:`logit_stats` and :func:`linear_divergence`. Each builds its options (:mod:`sftkey.options`),
prepares its inputs (:mod:`sftkey.core.inputs`) and hands them to the driver
(:mod:`sftkey.core.driver`) with the call's backend, or to the oracle (:mod:`sftkey.reference`)."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from .core import compiled, driver
from .core.inputs import check_topk, prepare
from .options import DivergenceOptions, HeadOptions, LossOptions, with_options
from .results import LogitStats, LossStats


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
    compiling = torch.compiler.is_compiling()
    if compiling and opts.anchor is not None:
        raise NotImplementedError("linear_cross_entropy(anchor=...) is not traced by torch.compile yet: call it "
                                  "outside the compiled region (or compile the model body only)")
    if compiling and opts.backend != "reference":
        return compiled.linear_cross_entropy(hidden, weight, targets, bias, opts)
    ref = None if opts.anchor is None else _frozen((*opts.anchor, None)[:3])
    p = prepare(hidden, weight, targets, bias, opts, ref=ref, check_values=not compiling)
    if opts.backend == "reference":
        return reference.linear_cross_entropy(hidden, weight, targets, bias=bias, **_fields(opts))
    loss, stats = driver.loss(p, driver.resolve_backend(opts.backend, p.head.x.device, p.head.x.dtype))
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
    check_topk(topk, p.terms.vocab_size)
    if opts.backend == "reference":
        return reference.logit_stats(hidden, weight, targets, bias=bias, topk=topk, **_fields(opts))
    with p.autocast_off():
        stats = driver.statistics(p, driver.resolve_backend(opts.backend, p.head.x.device, p.head.x.dtype), topk)
    return LogitStats.of(stats, p.y, p.shape)


@with_options(DivergenceOptions, after="ref_bias")
def linear_divergence(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor,
                      targets: Optional[Tensor] = None, *, bias: Optional[Tensor] = None,
                      ref_bias: Optional[Tensor] = None, options: Optional[DivergenceOptions] = None, **kwargs):
    """The divergence between the policy head's distribution ``p = softmax((hidden @ weight.T +
    bias) / T)`` and the reference head's ``q = softmax((ref_hidden @ ref_weight.T + ref_bias)
    / T)``, token by token, weighted and reduced; neither head's ``N x V`` logits are formed.

    ``hidden [..., D]``, ``weight [V, D]``, ``ref_hidden [..., D_ref]``, ``ref_weight [V,
    D_ref]`` (one float dtype, or any under autocast; the same vocabulary ``V``), ``targets``
    ``[...]`` int64/int32 or None: only which tokens count (``ignore_index``), not the loss.
    The options (:class:`~sftkey.options.DivergenceOptions`) are keyword arguments or
    ``options=``. Returns a float32 loss (float64 for float64 inputs): a scalar, or per token
    for ``reduction="none"``. The reference gets no gradient unless ``ref_grad=True``."""
    opts = DivergenceOptions.build(options, kwargs, "linear_divergence")
    ref = (ref_hidden, ref_weight, ref_bias) if opts.ref_grad else _frozen((ref_hidden, ref_weight, ref_bias))
    p = prepare(hidden, weight, targets, bias, opts, ref=ref)
    if opts.backend == "reference":
        return reference.linear_divergence(hidden, weight, *ref[:2], targets, bias=bias, ref_bias=ref[2],
                                           **_fields(opts))
    return driver.divergence(p, driver.resolve_backend(opts.backend, p.head.x.device, p.head.x.dtype))


def _frozen(tensors: tuple) -> tuple:
    """A reference head's tensors without gradient (anything else as it is, for the checks)."""
    return tuple(t.detach() if isinstance(t, Tensor) else t for t in tensors)


def _fields(opts) -> dict:
    return {f.name: getattr(opts, f.name) for f in fields(opts)}


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
