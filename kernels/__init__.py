"""Triton kernels of sftkey (shipped as ``sftkey.kernels``): the statistics forward and the
fused backward. Launched by :mod:`sftkey.backends.triton`; block shapes in :mod:`.configs`."""
from .backward import backward_kernel
from .configs import INTERPRETED, KernelConfig, default_config
from .forward import forward_kernel

__all__ = ["INTERPRETED", "KernelConfig", "backward_kernel", "default_config", "forward_kernel"]
