"""The options of the fused loss: one frozen object per call, validated once at construction.

Every entry point takes its option names from these classes: :func:`sftkey.linear_cross_entropy`,
:func:`sftkey.logit_stats` and :func:`sftkey.linear_divergence` (keyword arguments, or a
prebuilt object as ``options=``),
:class:`sftkey.LinearCrossEntropyLoss`, :mod:`sftkey.distributed` and
:func:`sftkey.integrations.transformers.use_fused_loss`.
"""
from __future__ import annotations

import inspect
from dataclasses import MISSING, dataclass, fields, replace
from typing import TYPE_CHECKING, Optional, Union

from torch import Tensor

from .core import validation

if TYPE_CHECKING:
    from .backends.base import Backend


class Options:
    """What every options class shares: its names and how a call builds one."""

    @classmethod
    def names(cls) -> tuple:
        """The option names, in field order (read from the dataclass's own table, which
        ``torch.compile`` traces, where ``dataclasses.fields`` of a class it does not)."""
        return tuple(cls.__dataclass_fields__)

    @classmethod
    def build(cls, options: Optional["Options"], kwargs: dict, caller: str):
        """``options`` (an instance, or None for the defaults) with ``kwargs`` replacing fields;
        a ``TypeError`` naming ``caller`` for a name that is not an option."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; its options are "
                            f"{list(cls.names())}")
        if options is None:
            return cls(**kwargs)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
        return replace(options, **kwargs) if kwargs else options


@dataclass(frozen=True)
class HeadOptions(Options):
    """What defines the logits rows and how they are computed.

    * ``class_weights`` ``[V]``: torch's ``weight=`` of ``F.cross_entropy`` (``c`` in ``Z = sum_j c_j z_j``).
    * ``softcap``: ``z <- softcap * tanh(z / softcap)`` (> 0), or None.
    * ``ignore_index``: the target value of tokens without a loss.
    * ``backend``: "auto", "torch", "triton", "triton-fused", "reference", or a :class:`~sftkey.backends.base.Backend`.
    * ``filter_eps``: skip gradient tiles whose probabilities are all below it (triton; None: exact).
    """

    class_weights: Optional[Tensor] = None
    softcap: Optional[float] = None
    ignore_index: int = -100
    backend: Union[str, "Backend"] = "auto"
    filter_eps: Optional[float] = None

    def __post_init__(self):
        validation.check_head_options(self)

    def check_tensors(self, targets: Tensor, vocab_size: int) -> None:
        """The tensor options' shapes and devices against ``targets`` and the vocabulary size."""
        validation.check_head_tensors(self, targets, vocab_size)


@dataclass(frozen=True)
class LossOptions(HeadOptions):
    """Every option of :func:`sftkey.linear_cross_entropy` (symbols of docs/design.md), beyond
    :class:`HeadOptions`:

    * ``token_weights`` ``[...]`` like the targets: the cross-entropy weight ``a_i`` (default 1).
    * ``entropy_weights`` ``[...]``, a scalar or None: the entropy coefficient ``e_i`` (default 0)
      of the term ``-e_i H_i``: ``e_i > 0`` rewards entropy (a bonus), ``e_i < 0`` penalizes it
      (entropy minimization); not in the ``"mean"``'s denominator.
    * ``label_smoothing`` in [0, 1]; ``z_loss`` (``zeta`` >= 0); ``dft``: ``s_i = stopgrad(p_y)``.
    * ``reduction``: "mean", "sum" or "none"; ``normalizer`` (> 0): the "mean" divisor instead
      of ``sum_i a_i w_{y_i}``.
    * ``shift``: position ``t`` predicts ``targets[..., t + 1]`` (weights shift with the targets).
    * ``return_stats``: also return the per-token :class:`~sftkey.LossStats`.
    * ``anchor``: ``(ref_hidden, ref_weight)`` or ``(ref_hidden, ref_weight, ref_bias)``, a
      frozen reference head: adds ``anchor_weight * a_i * D_i`` to each token's loss, ``D_i``
      the ``anchor_kind`` divergence (:class:`DivergenceOptions`; JSD with ``anchor_beta``)
      between the policy's and the reference's distributions at temperature 1, in the same
      pass over the policy logits. ``anchor_weight`` has no default: an anchor needs it.
      ASFT is ``dft=True, anchor_kind="forward_kl"``, its authors' weight 0.1
      (:func:`sftkey.methods.asft`).
    """

    token_weights: Optional[Tensor] = None
    entropy_weights: Union[Tensor, float, None] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    dft: bool = False
    reduction: str = "mean"
    normalizer: Union[Tensor, float, None] = None
    shift: bool = False
    return_stats: bool = False
    anchor: Optional[tuple] = None
    anchor_weight: Optional[float] = None
    anchor_kind: str = "forward_kl"
    anchor_beta: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        validation.check_loss_options(self)
        validation.check_anchor_options(self)

    def check_tensors(self, targets: Tensor, vocab_size: int) -> None:
        super().check_tensors(targets, vocab_size)
        validation.check_loss_tensors(self, targets)


@dataclass(frozen=True)
class DivergenceOptions(Options):
    """Every option of :func:`sftkey.linear_divergence` (docs/design.md, "Two heads"):

    * ``kind``: "forward_kl" (``KL(q || p)``, q the reference), "reverse_kl" (``KL(p || q)``)
      or "jsd" (``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``).
    * ``beta`` in [0, 1] (JSD only; Liger's ``jsd_beta`` ``b`` in (0, 1) is ``beta = 1 - b``,
      as its ``beta`` weights the teacher's term); ``temperature`` (> 0): both heads' logits divided by it
      (the loss is not scaled by ``T^2``; :func:`sftkey.methods.distill` is).
    * ``token_weights`` ``[...]`` like the tokens: the weight ``a_i`` (default 1);
      ``ignore_index``: the target value of tokens left out (with ``targets``).
    * ``reduction``: "mean", "sum" or "none"; ``normalizer`` (> 0): the "mean" divisor
      instead of ``sum_i a_i`` over the tokens that count.
    * ``shift``: position ``t`` pairs with ``targets[..., t + 1]`` (the last position drops out).
    * ``ref_grad``: also give gradients to ``ref_hidden``, ``ref_weight`` and ``ref_bias``
      (default False: the reference is frozen, its tensors detached).
    * ``backend``: "auto", "torch", "triton" (the forward and reverse KL's block math in
      Triton row kernels; not the JSD), or "reference" (the float64-capable oracle).
    """

    kind: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    token_weights: Optional[Tensor] = None
    ignore_index: int = -100
    shift: bool = False
    reduction: str = "mean"
    normalizer: Union[Tensor, float, None] = None
    ref_grad: bool = False
    backend: str = "auto"

    def __post_init__(self):
        validation.check_divergence_options(self)


def with_options(cls, *, after: str):
    """Give a function ``f(..., options=None, **kwargs)`` the signature that lists each field of
    ``cls`` as a keyword-only parameter with its default (for ``help()`` and ``inspect``), in
    place of ``**kwargs``; ``after`` is the parameter they follow."""

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = [p.name for p in params].index(after) + 1
        options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                     default=None if f.default is MISSING else f.default) for f in fields(cls)]
        fn.__signature__ = sig.replace(parameters=params[:at] + options + params[at:])
        return fn

    return decorate
