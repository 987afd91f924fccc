"""Triton kernels of sftkey (shipped as ``sftkey.kernels``): the fused statistics forward and
backward (launched by :mod:`sftkey.backends.triton`), and the row kernels of the single pass
(launched by :mod:`sftkey.backends.triton_rows`); block shapes in :mod:`.configs`."""
from .backward import backward_kernel
from .configs import INTERPRETED, KernelConfig, RowConfig, default_config, row_config
from .forward import forward_kernel
from .rows import row_grads_kernel, row_stats_kernel

__all__ = ["INTERPRETED", "KernelConfig", "RowConfig", "backward_kernel", "default_config", "forward_kernel",
           "row_config", "row_grads_kernel", "row_stats_kernel"]
