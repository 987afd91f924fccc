"""A call's inputs, checked once and flattened to ``N`` tokens: the heads a backend sees
(:class:`~sftkey.backends.engine.Head`, and a reference head for the two-head operations),
and the targets and :class:`~sftkey.core.loss.TokenTerms` the loss sees.

The tensors are checked here against each other and against the options (a ``ValueError`` or
``TypeError`` naming the argument; the options' own values are checked when the options are
made, :mod:`sftkey.options`). ``shift`` (position ``t`` predicts ``targets[..., t + 1]``) and
autocast (``hidden``, ``weight`` and ``bias`` in the autocast dtype, as ``F.linear`` would use
them) are applied here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor

from ..backends.engine import FLOAT_DTYPES, MAX_TOPK, Head, Pair, accumulation_dtype
from ..options import Options
from .loss import TokenTerms


@dataclass(frozen=True)
class Prepared:
    """The inputs of one call. ``head``: the policy head as the backend sees it; ``ref``: the
    reference head of a two-head call (an anchor, a divergence), else None; ``y`` ``[N]`` int64
    (``-1`` where ignored) and ``terms``: what the loss sees (``head.y`` is ``y`` except on a
    vocabulary shard); ``shape``: the targets' shape, that per-token outputs take."""

    head: Head
    ref: Optional[Head]
    y: Tensor
    terms: TokenTerms
    options: Options
    shape: torch.Size

    @property
    def acc(self) -> torch.dtype:
        """The accumulation dtype: float64 for float64 inputs, else float32."""
        return accumulation_dtype(self.head.x.dtype)

    @property
    def pair(self) -> Pair:
        return Pair(self.head, self.ref)

    def autocast_off(self):
        """Keep an enclosing ``torch.autocast`` from re-casting the backends' products."""
        return autocast_off(self.head.x.device.type)


def prepare(hidden, weight, targets, bias, options: Options, *, ref: Optional[tuple] = None,
            vocab_size: Optional[int] = None, check_values: bool = True) -> Prepared:
    """Check every input against ``options``, apply autocast and ``shift``, flatten to ``N`` tokens.

    ``ref``: ``(ref_hidden, ref_weight, ref_bias)`` of a two-head call (their class weights and
    soft-cap are the block functions' business); ``targets`` may then be None: every position
    counts (with ``shift``, all but the last). ``vocab_size``: the vocabulary that ``targets``
    and ``class_weights`` index, when ``weight`` holds only a shard of it
    (:mod:`sftkey.distributed`); default ``weight``'s rows. ``check_values`` False: leave out
    the checks that read the targets' and weights' values on the host (:mod:`sftkey.core.compiled`
    makes them inside its ops)."""
    ignore_index = options.ignore_index
    if targets is None and ref is not None and isinstance(hidden, Tensor):
        targets, ignore_index = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device), -1
    autocast = isinstance(hidden, Tensor) and autocast_enabled(hidden.device.type)
    check_head(hidden, weight, targets, bias, autocast=autocast)
    if ref is not None:
        check_pair(hidden, weight, *ref)
    V = weight.shape[0] if vocab_size is None else vocab_size
    _check_option_tensors(options, targets, V)
    if check_values:
        check_values_of(targets, V, ignore_index, getattr(options, "token_weights", None),
                        getattr(options, "entropy_weights", None))
    shift = getattr(options, "shift", False)
    y = flat_targets(targets, ignore_index, shift)
    head = _head(hidden, weight, bias, y)
    acc = accumulation_dtype(head.x.dtype)
    c, softcap = getattr(options, "class_weights", None), getattr(options, "softcap", None)
    c = None if c is None else c.to(acc)
    head = replace(head, c=c, softcap=None if softcap is None else float(softcap))
    per_token = {name: flat_weights(getattr(options, name), shift, acc) for name in options.per_token()}
    return Prepared(head=head, ref=None if ref is None else _head(*ref, y), y=y,
                    terms=TokenTerms.of(options, per_token, V, c), options=options, shape=targets.shape)


def _head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor) -> Head:
    """A head over the tokens of ``y``: autocast applied, the hidden states flattened to ``[N, D]``."""
    hidden, weight, bias = _autocast(hidden, weight, bias)
    return Head(x=hidden.reshape(-1, hidden.shape[-1]).contiguous(), w=weight.contiguous(),
                b=None if bias is None else bias.contiguous(), y=y, c=None, softcap=None)


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


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (False where autocast has no such device)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_off(device_type: str):
    """A context that switches an enclosing ``torch.autocast`` off on ``device_type`` (else nothing)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast to the autocast dtype exactly as ``F.linear`` would; gradients flow back in the
    inputs' own dtypes."""
    device_type = hidden.device.type
    if not autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


# ---- the checks of the tensors ----------------------------------------------------------------

def _tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _floating(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _same_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")


def _shaped(name: str, t: Tensor, shape: torch.Size, what: str) -> None:
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")


def check_head(hidden, weight, targets, bias, *, autocast: bool) -> None:
    """Types, shapes, dtypes and devices of ``hidden [..., D]``, ``weight [V, D]``,
    ``targets [...]`` and ``bias [V]``."""
    hidden, weight, targets = _tensor("hidden", hidden), _tensor("weight", weight), _tensor("targets", targets)
    _floating("hidden", hidden)
    _floating("weight", weight)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has D={weight.shape[1]} but hidden has D={hidden.shape[-1]}")
    if weight.shape[0] == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"weight must have V >= 1 and D >= 1, got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype and not autocast:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype outside torch.autocast")
    _same_device("weight", weight, hidden.device)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    _shaped("targets", targets, hidden.shape[:-1], "hidden's leading dimensions")
    _same_device("targets", targets, hidden.device)
    if targets.numel() == 0:
        raise ValueError("targets is empty: there is no token to compute a loss for")
    if bias is not None:
        bias = _tensor("bias", bias)
        _floating("bias", bias)
        _shaped("bias", bias, weight.shape[:1], "[V]")
        _same_device("bias", bias, hidden.device)
        if bias.dtype != weight.dtype and not autocast:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must share a dtype outside torch.autocast")


def check_pair(hidden: Tensor, weight: Tensor, ref_hidden, ref_weight, ref_bias) -> None:
    """The reference head against the policy's (checked first by :func:`check_head`):
    ``ref_hidden [..., D_ref]`` with ``hidden``'s leading dimensions, ``ref_weight [V, D_ref]``
    with ``weight``'s vocabulary, ``ref_bias [V]``; floating, on ``hidden``'s device; the
    reference in the policy's dtype outside autocast."""
    ref_hidden, ref_weight = _tensor("ref_hidden", ref_hidden), _tensor("ref_weight", ref_weight)
    _floating("ref_hidden", ref_hidden)
    _floating("ref_weight", ref_weight)
    if ref_weight.dim() != 2:
        raise ValueError(f"ref_weight must have shape [V, D_ref], got {tuple(ref_weight.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has V={ref_weight.shape[0]} but weight has V={weight.shape[0]}: the two heads "
                         "must share the vocabulary")
    if ref_hidden.dim() < 1 or ref_weight.shape[1] != ref_hidden.shape[-1]:
        raise ValueError(f"ref_weight has D_ref={ref_weight.shape[1]} but ref_hidden has shape {tuple(ref_hidden.shape)}")
    if ref_weight.shape[1] == 0:
        raise ValueError("ref_weight must have D_ref >= 1")
    _shaped("ref_hidden", ref_hidden, torch.Size([*hidden.shape[:-1], ref_hidden.shape[-1]]),
            "hidden's leading dimensions")
    autocast = autocast_enabled(hidden.device.type)
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is None:
            continue
        t = _tensor(name, t)
        _floating(name, t)
        _same_device(name, t, hidden.device)
        if t.dtype != hidden.dtype and not autocast:
            raise TypeError(f"{name} ({t.dtype}) and hidden ({hidden.dtype}) must share a dtype outside torch.autocast")
    if ref_bias is not None:
        _shaped("ref_bias", ref_bias, weight.shape[:1], "[V]")


def _check_option_tensors(options: Options, targets: Tensor, vocab_size: int) -> None:
    """The options' tensors against the targets: ``class_weights`` ``[V]``, the per-token ones
    shaped like ``targets`` (``entropy_weights``: or a scalar), each on the targets' device;
    ``shift`` has a sequence dimension to shift along."""
    c = getattr(options, "class_weights", None)
    if c is not None:
        _shaped("class_weights", c, torch.Size([vocab_size]), "[V]")
        _same_device("class_weights", c, targets.device)
    for name in options.per_token():
        t = getattr(options, name)
        if isinstance(t, Tensor):
            scalar = name == "entropy_weights" and t.dim() == 0
            if not scalar:
                _shaped(name, t, targets.shape, "the shape of targets" + (", or a scalar" if name == "entropy_weights"
                                                                          else ""))
            _same_device(name, t, targets.device)
    if getattr(options, "shift", False) and targets.dim() < 1:
        raise ValueError("shift=True needs targets with a sequence dimension, got a 0-d tensor")


def check_topk(topk, vocab_size: int) -> None:
    """``topk`` is an int in ``[0, min(MAX_TOPK, V)]``."""
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be an int in [0, {MAX_TOPK}], got {topk!r}")
    if topk > vocab_size:
        raise ValueError(f"topk={topk} exceeds the vocabulary size {vocab_size}")


def check_values_of(targets: Tensor, vocab_size: int, ignore_index: int, token_weights: Optional[Tensor],
                    entropy_weights=None) -> None:
    """The checks that read the tensors' values on the host: the targets lie in ``[0, V)`` or
    equal ``ignore_index``; the token weights are >= 0 and finite (a negative weight would turn
    its token's loss into a reward for lowering the target's probability, and could make the
    ``"mean"`` denominator 0 or negative; an infinite one makes the mean inf / inf = NaN); the
    entropy weights are finite (of either sign: ``LossOptions.entropy_weights``)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise ValueError(f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {value}")
    check_token_weights(token_weights)
    if isinstance(entropy_weights, Tensor) and not bool(torch.isfinite(entropy_weights).all()):
        value = float(entropy_weights[~torch.isfinite(entropy_weights)].flatten()[0])
        raise ValueError(f"entropy_weights must be finite; found {value}")


def check_token_weights(token_weights: Optional[Tensor]) -> None:
    """``token_weights``, when given, are >= 0 and finite (:func:`check_values_of`)."""
    if token_weights is None:
        return
    bad = ~((token_weights >= 0) & torch.isfinite(token_weights))
    if bool(bad.any()):
        value = float(token_weights[bad].flatten()[0])
        raise ValueError(f"token_weights must be >= 0 and finite (a weight per token, 0 to leave it out); "
                         f"found {value}")
