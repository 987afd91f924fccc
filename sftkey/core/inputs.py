"""A call's inputs, checked once and flattened to ``N`` tokens: what the passes hand a backend
(:class:`~sftkey.backends.base.Head`) and the loss (targets and :class:`~sftkey.core.loss.TokenTerms`).

``shift`` (position ``t`` predicts ``targets[..., t + 1]``) and autocast (``hidden``, ``weight``
and ``bias`` in the autocast dtype, as ``F.linear`` would use them) are applied here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from . import validation
from ..backends.base import Head, accumulation_dtype
from ..backends.pair import Pair
from .loss import TokenTerms
from ..options import DivergenceOptions, HeadOptions, LossOptions


@dataclass(frozen=True)
class Prepared:
    """The inputs of one call. ``head``: what the backend sees; ``y`` ``[N]`` int64 (``-1`` where
    ignored) and ``terms``: what the loss sees (``head.y`` is ``y`` except on a vocabulary shard);
    ``shape``: the targets' shape, that per-token outputs take."""

    head: Head
    y: Tensor
    terms: TokenTerms
    options: HeadOptions
    shape: torch.Size

    @property
    def acc(self) -> torch.dtype:
        """The accumulation dtype: float64 for float64 inputs, else float32."""
        return accumulation_dtype(self.head.x.dtype)

    def autocast_off(self):
        """Keep an enclosing ``torch.autocast`` from re-casting the backends' products."""
        return autocast_off(self.head.x.device.type)


def autocast_off(device_type: str):
    """A context that switches an enclosing ``torch.autocast`` off on ``device_type`` (else nothing)."""
    if validation.autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def shifted(t: Tensor, fill) -> Tensor:
    """Position ``t`` takes the entry of ``t + 1``; the last position gets ``fill``."""
    return torch.cat([t[..., 1:], torch.full_like(t[..., :1], fill)], dim=-1)


def flat_targets(targets: Tensor, ignore_index: int, shift: bool) -> Tensor:
    """``targets`` shifted (if ``shift``) and flattened to int64 ``[N]``, ``-1`` where ignored."""
    if shift:
        targets = shifted(targets, ignore_index)
    return torch.where(targets == ignore_index, -1, targets).reshape(-1).long()


def flat_weights(weights: Union[Tensor, float, None], shift: bool, dtype: torch.dtype):
    """Per-token weights indexed like ``targets``, shifted with them and flattened to ``[N]``
    in ``dtype``; a scalar (tensor or number) or None passes through."""
    if not isinstance(weights, Tensor) or weights.dim() == 0:
        return weights.to(dtype) if isinstance(weights, Tensor) else weights
    return (shifted(weights, 0) if shift else weights).reshape(-1).to(dtype)


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


def prepare(hidden, weight, targets, bias, options: HeadOptions, *, vocab_size: Optional[int] = None,
            check_values: bool = True) -> Prepared:
    """Check every input against ``options``, apply autocast and ``shift``, flatten to ``N`` tokens.

    ``vocab_size``: the vocabulary that ``targets`` and ``class_weights`` index, when
    ``weight`` holds only a shard of it (:mod:`sftkey.distributed`); default ``weight``'s rows.
    ``check_values`` False: leave out the checks of the targets' and weights' values (they
    read them on the host; :mod:`sftkey.core.compiled` makes them inside its ops)."""
    autocast = isinstance(hidden, Tensor) and validation.autocast_enabled(hidden.device.type)
    validation.check_head(hidden, weight, targets, bias, autocast=autocast)
    V = weight.shape[0] if vocab_size is None else vocab_size
    options.check_tensors(targets, V)
    if check_values:
        validation.check_values(targets, V, options.ignore_index, getattr(options, "token_weights", None))
    hidden, weight, bias = _autocast(hidden, weight, bias)
    acc = accumulation_dtype(hidden.dtype)
    shift = isinstance(options, LossOptions) and options.shift
    c = None if options.class_weights is None else options.class_weights.to(acc)
    terms = TokenTerms(vocab_size=V, class_weights=c)
    if isinstance(options, LossOptions):
        terms = TokenTerms(
            vocab_size=V, class_weights=c, token_weights=flat_weights(options.token_weights, shift, acc),
            entropy_weights=flat_weights(options.entropy_weights, shift, acc),
            label_smoothing=float(options.label_smoothing), z_loss=float(options.z_loss), dft=options.dft)
    y = flat_targets(targets, options.ignore_index, shift)
    head = Head(x=hidden.reshape(-1, hidden.shape[-1]).contiguous(), w=weight.contiguous(),
                b=None if bias is None else bias.contiguous(), y=y, c=c,
                softcap=None if options.softcap is None else float(options.softcap))
    return Prepared(head=head, y=y, terms=terms, options=options, shape=targets.shape)


@dataclass(frozen=True)
class PreparedPair:
    """The inputs of a two-head call: ``pair`` (:class:`~sftkey.backends.pair.Pair`, every
    token, ``rows`` None); ``valid`` ``[N]`` bool: the tokens that count (not ignored; after
    ``shift``); ``weights`` ``[N]`` in the accumulation dtype or None (ones); ``shape``: the
    shape per-token outputs take."""

    pair: Pair
    valid: Tensor
    weights: Optional[Tensor]
    shape: torch.Size

    @property
    def acc(self) -> torch.dtype:
        return accumulation_dtype(self.pair.policy.x.dtype)

    def autocast_off(self):
        return autocast_off(self.pair.policy.x.device.type)


def pair_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor) -> Head:
    """One head of a two-head call over the ``N`` tokens of ``y``: autocast applied, the hidden
    states flattened to ``[N, D]`` (no class weights or soft-cap: the block functions' business)."""
    hidden, weight, bias = _autocast(hidden, weight, bias)
    return Head(x=hidden.reshape(-1, hidden.shape[-1]).contiguous(), w=weight.contiguous(),
                b=None if bias is None else bias.contiguous(), y=y, c=None, softcap=None)


def prepare_pair(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, options: DivergenceOptions,
                 check_values: bool = True) -> PreparedPair:
    """Check both heads and the options, apply autocast and ``shift``, flatten to ``N`` tokens.
    ``targets`` None: every position counts (with ``shift``, all but the last)."""
    ignore_index = options.ignore_index
    if targets is None and isinstance(hidden, Tensor):
        targets, ignore_index = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device), -1
    autocast = isinstance(hidden, Tensor) and validation.autocast_enabled(hidden.device.type)
    validation.check_head(hidden, weight, targets, bias, autocast=autocast)
    validation.check_pair(hidden, weight, ref_hidden, ref_weight, ref_bias)
    validation.check_token_weights(options.token_weights, targets)
    if options.shift and targets.dim() < 1:
        raise ValueError("shift=True needs tokens with a sequence dimension, got 0-d targets")
    if check_values:
        validation.check_values(targets, weight.shape[0], ignore_index, options.token_weights)
    y = flat_targets(targets, ignore_index, options.shift)
    policy = pair_head(hidden, weight, bias, y)
    acc = accumulation_dtype(policy.x.dtype)
    return PreparedPair(Pair(policy, pair_head(ref_hidden, ref_weight, ref_bias, y)), y >= 0,
                        flat_weights(options.token_weights, options.shift, acc), targets.shape)
