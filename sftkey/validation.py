"""Argument checks of the public API: a ValueError or TypeError naming the argument and what
was expected. Nothing is broadcast or clipped silently."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .backends import BACKEND_NAMES

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


MAX_TOPK = 8


def check_topk(topk, vocab_size: int) -> None:
    """``topk`` is an int in ``[0, min(8, V)]``."""
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


def check_options(targets: Tensor, vocab_size: int, *, token_weights, entropy_weights, class_weights,
                  ignore_index, label_smoothing, z_loss, softcap, dft, reduction, normalizer, shift,
                  backend, filter_eps, topk=0) -> None:
    """Every loss option, against ``targets [...]`` and the vocabulary size."""
    device = targets.device
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if token_weights is not None:
        token_weights = _tensor("token_weights", token_weights)
        _floating("token_weights", token_weights)
        _shaped("token_weights", token_weights, targets.shape, "the shape of targets")
        _same_device("token_weights", token_weights, device)
    if entropy_weights is not None and not isinstance(entropy_weights, numbers.Real):
        entropy_weights = _tensor("entropy_weights", entropy_weights)
        _floating("entropy_weights", entropy_weights)
        if entropy_weights.dim() != 0:
            _shaped("entropy_weights", entropy_weights, targets.shape, "the shape of targets, or a scalar")
        _same_device("entropy_weights", entropy_weights, device)
    elif entropy_weights is not None:
        _number("entropy_weights", entropy_weights)
    if class_weights is not None:
        class_weights = _tensor("class_weights", class_weights)
        _floating("class_weights", class_weights)
        _shaped("class_weights", class_weights, torch.Size([vocab_size]), "[V]")
        _same_device("class_weights", class_weights, device)
    _number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    _number("z_loss", z_loss, low=0.0)
    if softcap is not None:
        _number("softcap", softcap, low=0.0, low_open=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if isinstance(normalizer, Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
            value = float(normalizer)
        else:
            value = _number("normalizer", normalizer)
        if not value > 0:
            raise ValueError(f"normalizer must be > 0, got {value}")
    if not isinstance(dft, bool):
        raise TypeError(f"dft must be a bool, got {type(dft).__name__}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {type(shift).__name__}")
    if shift and targets.dim() < 1:
        raise ValueError("shift=True needs targets with a sequence dimension, got a 0-d tensor")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if filter_eps is not None:
        _number("filter_eps", filter_eps, low=0.0)
    check_topk(topk, vocab_size)
