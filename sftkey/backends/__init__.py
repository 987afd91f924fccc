"""Backend registry: a name -> a :class:`~sftkey.backends.base.Backend` instance, imported lazily."""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from .base import Backend, BlockLoss, Head, Needs, StatGrads, Stats

_REGISTRY = {
    "torch": "sftkey.backends.torch:TorchBackend",
    "triton": "sftkey.backends.triton:TritonBackend",
}

BACKEND_NAMES = ("auto", "reference", *_REGISTRY)


@lru_cache(maxsize=None)
def _load(name: str) -> Backend:
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` ("auto": triton where it can run on ``device``, else torch)."""
    if name == "auto":
        if device.type == "cuda" and triton_usable(device):
            return _load("triton")
        return _load("torch")
    backend = _load(name)
    if not backend.available(device):
        raise ValueError(f"backend={name!r} cannot run on device {device}")
    return backend


def triton_usable(device: torch.device) -> bool:
    try:
        return _load("triton").available(device)
    except ImportError:
        return False


__all__ = ["Backend", "BlockLoss", "Head", "Needs", "StatGrads", "Stats", "get_backend", "BACKEND_NAMES"]
