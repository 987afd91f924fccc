"""Argument checks of the public API: a ValueError or TypeError naming the argument and what
was expected. Nothing is broadcast or clipped silently."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from ..backends import BACKEND_NAMES, Backend
from ..backends.base import MAX_TOPK

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


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


def _number(name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (False where autocast has no such device)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


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


def check_topk(topk, vocab_size: int) -> None:
    """``topk`` is an int in ``[0, min(MAX_TOPK, V)]``."""
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be an int in [0, {MAX_TOPK}], got {topk!r}")
    if topk > vocab_size:
        raise ValueError(f"topk={topk} exceeds the vocabulary size {vocab_size}")


def check_targets_range(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Targets lie in ``[0, V)`` or equal ``ignore_index``."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise ValueError(f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {value}")


def check_token_weights_sign(token_weights) -> None:
    """``token_weights``, when given, are >= 0 and finite: a negative weight would turn its
    token's loss into a reward for lowering the target's probability, and could make the
    ``"mean"`` denominator 0 or negative; an infinite one makes the mean inf / inf = NaN.
    (Validate the type and shape first: :func:`check_loss_tensors`.)"""
    if token_weights is None:
        return
    bad = ~((token_weights >= 0) & torch.isfinite(token_weights))
    if bool(bad.any()):
        value = float(token_weights[bad].flatten()[0])
        raise ValueError(f"token_weights must be >= 0 and finite (a weight per token, 0 to leave it out); "
                         f"found {value}")


def check_values(targets: Tensor, vocab_size: int, ignore_index: int, token_weights: Optional[Tensor]) -> None:
    """The checks that read the tensors' values on the host: the targets' range and the token
    weights' sign (:mod:`sftkey.core.compiled` makes them inside its ops under ``torch.compile``)."""
    check_targets_range(targets, vocab_size, ignore_index)
    check_token_weights_sign(token_weights)


def _ignore_index(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(value).__name__}")


def _reduction_and_normalizer(opts) -> None:
    """``reduction`` one of :data:`REDUCTIONS`; ``normalizer`` None or a number / one-element
    tensor > 0 (a tensor's value is read on the host: inside sftkey.core.compiled's op under
    ``torch.compile``)."""
    if opts.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {opts.reduction!r}")
    if opts.normalizer is None:
        return
    if isinstance(opts.normalizer, Tensor):
        if opts.normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(opts.normalizer.shape)}")
        value = None if torch.compiler.is_compiling() else float(opts.normalizer)
    else:
        value = _number("normalizer", opts.normalizer)
    if value is not None and not value > 0:
        raise ValueError(f"normalizer must be > 0, got {value}")


def _bools(opts, names: tuple) -> None:
    for name in names:
        if not isinstance(getattr(opts, name), bool):
            raise TypeError(f"{name} must be a bool, got {type(getattr(opts, name)).__name__}")


def check_head_options(opts) -> None:
    """The options of a :class:`~sftkey.options.HeadOptions` (the types of its tensors; their
    shapes in :func:`check_head_tensors`)."""
    _ignore_index(opts.ignore_index)
    if opts.class_weights is not None:
        _floating("class_weights", _tensor("class_weights", opts.class_weights))
    if opts.softcap is not None:
        _number("softcap", opts.softcap, low=0.0, low_open=True)
    if isinstance(opts.backend, str):
        if opts.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES} or a Backend, got {opts.backend!r}")
    elif not isinstance(opts.backend, Backend):
        raise TypeError(f"backend must be a name or a sftkey Backend, got {type(opts.backend).__name__}")
    if opts.filter_eps is not None:
        _number("filter_eps", opts.filter_eps, low=0.0)


def check_loss_options(opts) -> None:
    """The options a :class:`~sftkey.options.LossOptions` adds (shapes in :func:`check_loss_tensors`)."""
    if opts.token_weights is not None:
        _floating("token_weights", _tensor("token_weights", opts.token_weights))
    ew = opts.entropy_weights
    if ew is not None and not isinstance(ew, numbers.Real):
        _floating("entropy_weights", _tensor("entropy_weights", ew))
    elif ew is not None:
        _number("entropy_weights", ew)
    _number("label_smoothing", opts.label_smoothing, low=0.0, high=1.0)
    _number("z_loss", opts.z_loss, low=0.0)
    _reduction_and_normalizer(opts)
    _bools(opts, ("dft", "shift", "return_stats"))


def check_head_tensors(opts, targets: Tensor, vocab_size: int) -> None:
    """``class_weights`` is ``[V]`` on the targets' device."""
    if opts.class_weights is not None:
        _shaped("class_weights", opts.class_weights, torch.Size([vocab_size]), "[V]")
        _same_device("class_weights", opts.class_weights, targets.device)


def check_token_weights(token_weights: Optional[Tensor], targets: Tensor) -> None:
    """``token_weights``, when given, are shaped like ``targets`` on its device."""
    if token_weights is not None:
        _shaped("token_weights", token_weights, targets.shape, "the shape of targets")
        _same_device("token_weights", token_weights, targets.device)


def check_loss_tensors(opts, targets: Tensor) -> None:
    """The per-token options are shaped like ``targets [...]`` (``entropy_weights``: or a
    scalar) on its device; ``shift`` has a sequence dimension to shift along."""
    check_token_weights(opts.token_weights, targets)
    ew = opts.entropy_weights
    if isinstance(ew, Tensor):
        if ew.dim() != 0:
            _shaped("entropy_weights", ew, targets.shape, "the shape of targets, or a scalar")
        _same_device("entropy_weights", ew, targets.device)
    if opts.shift and targets.dim() < 1:
        raise ValueError("shift=True needs targets with a sequence dimension, got a 0-d tensor")


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kind(name: str, value) -> None:
    if value not in DIVERGENCES:
        raise ValueError(f"{name} must be one of {DIVERGENCES}, got {value!r}")


def check_divergence_options(opts) -> None:
    """The options of a :class:`~sftkey.options.DivergenceOptions` (shapes in :func:`check_pair`)."""
    _kind("kind", opts.kind)
    _number("beta", opts.beta, low=0.0, high=1.0)
    _number("temperature", opts.temperature, low=0.0, low_open=True)
    _ignore_index(opts.ignore_index)
    if opts.token_weights is not None:
        _floating("token_weights", _tensor("token_weights", opts.token_weights))
    _reduction_and_normalizer(opts)
    _bools(opts, ("shift", "ref_grad"))
    if opts.backend not in ("auto", "torch", "triton", "reference"):
        raise ValueError(f"backend must be one of ('auto', 'torch', 'triton', 'reference'), got {opts.backend!r}")
    _triton_kind("kind", opts.kind, opts.backend)


def check_anchor_options(opts) -> None:
    """The anchor options of a :class:`~sftkey.options.LossOptions` (tensors in :func:`check_pair`)."""
    _kind("anchor_kind", opts.anchor_kind)
    if opts.anchor_weight is not None:
        _number("anchor_weight", opts.anchor_weight)
    _number("anchor_beta", opts.anchor_beta, low=0.0, high=1.0)
    if opts.anchor is None:
        return
    if not isinstance(opts.anchor, tuple) or len(opts.anchor) not in (2, 3):
        raise TypeError("anchor must be a tuple (ref_hidden, ref_weight) or (ref_hidden, ref_weight, ref_bias)")
    _triton_kind("anchor_kind", opts.anchor_kind, opts.backend)
    if opts.anchor_weight is None:
        raise ValueError("anchor_weight is required with an anchor (it has no default; ASFT's authors use 0.1, "
                         "sftkey.methods.ASFT_ANCHOR_WEIGHT)")


def _triton_kind(name: str, kind: str, backend) -> None:
    """The triton backend's two-head kernels are the forward and reverse KL's: "jsd" is refused."""
    if isinstance(backend, str) and backend == "triton" and kind == "jsd":
        raise ValueError(f"{name}='jsd' has no triton kernels (the JSD is not a function of per-row "
                         "statistics): use backend='torch' (or 'auto'), or kind 'forward_kl' / 'reverse_kl'")


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
