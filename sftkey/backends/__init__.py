"""Backend registry: a name -> a :class:`~sftkey.backends.base.Backend` instance, imported lazily."""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Union

import torch

from .base import Backend

_REGISTRY = {
    "torch": "sftkey.backends.torch:TorchBackend",
    "triton": "sftkey.backends.triton:TritonBackend",
    "triton-fused": "sftkey.backends.triton_fused:FusedTritonBackend",
}

BACKEND_NAMES = ("auto", "reference", *_REGISTRY)


@lru_cache(maxsize=None)
def _load(name: str) -> Backend:
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def get_backend(backend: Union[str, Backend], device: torch.device) -> Backend:
    """The backend called ``backend`` ("auto": triton on a CUDA device of a generation its
    kernels have block shapes for, else torch), or ``backend`` itself when it is an instance;
    a ``ValueError`` where it cannot run on ``device``."""
    if isinstance(backend, Backend):
        chosen, name = backend, backend.name
    elif backend == "auto":
        return _load("triton") if device.type == "cuda" and triton_usable(device) else _load("torch")
    else:
        chosen, name = _load(backend), backend
    if not chosen.available(device):
        raise ValueError(f"backend={name!r} cannot run on device {device}")
    return chosen


def triton_usable(device: torch.device) -> bool:
    """Whether the triton backends can run on ``device``, with block shapes for its GPU."""
    try:
        from .triton_fused import known_gpu

        return _load("triton").available(device) and known_gpu(device)
    except ImportError:
        return False


__all__ = ["Backend", "BACKEND_NAMES", "get_backend", "triton_usable"]
