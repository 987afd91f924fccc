"""The fused Triton backend (``backend="triton-fused"``): the fused tile kernels
(:mod:`sftkey.kernels.forward`, :mod:`sftkey.kernels.backward`) in every pass, on CUDA, or on
the CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before importing
Triton. The tightest memory (``O(N)`` beyond the gradients' float32 buffers); ``8NDV`` for a
scalar loss (the generic single pass: the forward, then the recompute backward).

A head's ``rows`` are gathered first (the kernels read contiguous rows of X). Where the
kernels cannot run (a GPU of a generation without launch settings; a configuration whose
launch raised Triton's ``OutOfResources``) the torch backend runs instead, warned once per
device or configuration (:func:`or_torch`).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import triton  # noqa: F401  (ImportError here tells the registry that triton is unusable)
from triton.runtime.errors import OutOfResources

from sftkey.kernels.backward import backward
from sftkey.kernels.configs import INTERPRETED, KERNEL_DTYPES, KernelConfig, default_config, known_gpu
from sftkey.kernels.forward import forward

from .engine import MAX_TOPK, Backend, Head, Needs, RowStats, StatGrads
from .torch import TorchBackend

def check_dtype(dtype: torch.dtype) -> None:
    """The kernels take the dtypes of :data:`KERNEL_DTYPES`."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {dtype}; "
                        "use backend='torch' for float64")


def check_inputs(head: Head) -> None:
    """The kernels' inputs: one dtype of :data:`KERNEL_DTYPES`, contiguous tensors."""
    x, w = head.x, head.w
    check_dtype(x.dtype)
    if w.dtype != x.dtype or (head.b is not None and head.b.dtype != x.dtype):
        raise TypeError(f"backend='triton': hidden ({x.dtype}), weight ({w.dtype}) and bias must share a dtype")
    for name, t in (("hidden", x), ("weight", w), ("bias", head.b), ("targets", head.y),
                    ("class_weights", head.c)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"backend='triton': {name} must be contiguous")


def configuration(head: Head, method: str) -> tuple:
    """What a launch's resources depend on: the method (its kernels), the device, the dtype and
    the flags that add work to a tile (bias, class weights, soft-cap)."""
    return (method, str(head.x.device), head.x.dtype, head.b is not None, head.c is not None,
            head.softcap is not None)


def or_torch(method):
    """Run a backend method, or the torch backend's where the kernels cannot run: on a device
    without launch settings (a GPU of an unknown generation), or for a configuration
    (:func:`configuration`) whose launch raised Triton's ``OutOfResources``. Each fallback is
    kept per device or per configuration, and warned once, naming its reason."""

    @functools.wraps(method)
    def run(self, head: Head, *args, **kwargs):
        key = configuration(head, method.__name__)
        if not known_gpu(head.x.device):
            self._refuse(str(head.x.device), f"no launch settings for {head.x.device}")
        elif key not in self.refused:
            try:
                return method(self, head, *args, **kwargs)
            except OutOfResources as e:
                self._refuse(key, f"{e} ({method.__name__} on {key[1]}, {key[2]}, bias/class weights/soft-cap "
                                  f"{key[3:]})")
        return getattr(self.torch, method.__name__)(head, *args, **kwargs)

    return run


class FusedTritonBackend(Backend):
    """The fused tile kernels in every pass (module docstring). ``forward_config`` /
    ``backward_config`` override the block shapes of :mod:`sftkey.kernels.configs`;
    ``vocab_splits`` fixes the forward's programs per row block."""

    name = "triton-fused"

    def __init__(self, forward_config: Optional[KernelConfig] = None,
                 backward_config: Optional[KernelConfig] = None, vocab_splits: Optional[int] = None):
        self.forward_config = forward_config
        self.backward_config = backward_config
        self.vocab_splits = vocab_splits
        #: device or configuration -> why it runs the torch backend (:func:`or_torch`)
        self.refused: dict = {}
        self.torch = TorchBackend()

    def _refuse(self, key, why: str) -> None:
        if key not in self.refused:
            self.refused[key] = why
            warnings.warn(f"backend={self.name!r}: {why}; using backend='torch' there instead", RuntimeWarning,
                          stacklevel=4)

    def available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.is_available()
        return device.type == "cpu" and INTERPRETED

    @or_torch
    def forward(self, head: Head, topk: int = 0) -> RowStats:
        head = head.gathered()
        check_inputs(head)
        x = head.x
        if not 0 <= topk <= min(MAX_TOPK, head.w.shape[0]):
            raise ValueError(f"backend='triton': topk must be in [0, {min(MAX_TOPK, head.w.shape[0])}], got {topk}")
        cfg = self.forward_config or default_config("forward", x.dtype, x.device)
        return RowStats(*forward(x, head.w, head.b, head.y, head.c, head.softcap, topk, cfg, self.vocab_splits))

    @or_torch
    def backward(self, head: Head, stats: RowStats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None) -> tuple:
        rows, head = head, head.gathered()
        check_inputs(head)
        x, w, b = head.x, head.w, head.b
        cfg = self.backward_config or default_config("backward", x.dtype, x.device)
        dx, dw, db = backward(x, w, b, head.y, head.c, head.softcap, stats.lse, stats.expected_logit, grads,
                              needs, filter_eps, cfg)
        return (rows.scattered(None if dx is None else dx.to(x.dtype)),
                None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(b.dtype))
