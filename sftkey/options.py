"""The options of the fused loss: one frozen object per call, validated once at construction.

Every entry point takes its option names from these classes: :func:`sftkey.linear_cross_entropy`
and :func:`sftkey.logit_stats` (keyword arguments, or a prebuilt object as ``options=``),
:class:`sftkey.LinearCrossEntropyLoss`, :mod:`sftkey.distributed` and
:func:`sftkey.integrations.transformers.use_fused_loss`.
"""
from __future__ import annotations

import inspect
from dataclasses import MISSING, dataclass, fields, replace
from typing import TYPE_CHECKING, Optional, Union

from torch import Tensor

from . import validation

if TYPE_CHECKING:
    from .backends.base import Backend


@dataclass(frozen=True)
class HeadOptions:
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

    @classmethod
    def names(cls) -> tuple:
        """The option names, in field order (read from the dataclass's own table, which
        ``torch.compile`` traces, where ``dataclasses.fields`` of a class it does not)."""
        return tuple(cls.__dataclass_fields__)

    @classmethod
    def build(cls, options: Optional["HeadOptions"], kwargs: dict, caller: str):
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
class LossOptions(HeadOptions):
    """Every option of :func:`sftkey.linear_cross_entropy` (symbols of docs/design.md), beyond
    :class:`HeadOptions`:

    * ``token_weights`` ``[...]`` like the targets: the cross-entropy weight ``a_i`` (default 1).
    * ``entropy_weights`` ``[...]``, a scalar or None: the entropy coefficient ``e_i`` (default 0).
    * ``label_smoothing`` in [0, 1]; ``z_loss`` (``zeta`` >= 0); ``dft``: ``s_i = stopgrad(p_y)``.
    * ``reduction``: "mean", "sum" or "none"; ``normalizer`` (> 0): the "mean" divisor instead
      of ``sum_i a_i w_{y_i}``.
    * ``shift``: position ``t`` predicts ``targets[..., t + 1]`` (weights shift with the targets).
    * ``return_stats``: also return the per-token :class:`~sftkey.LossStats`.
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

    def __post_init__(self):
        super().__post_init__()
        validation.check_loss_options(self)

    def check_tensors(self, targets: Tensor, vocab_size: int) -> None:
        super().check_tensors(targets, vocab_size)
        validation.check_loss_tensors(self, targets)


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
