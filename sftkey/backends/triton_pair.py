"""The forward and reverse KL rows of the two-head pass in Triton (:mod:`sftkey.kernels.pair_rows`):
:func:`rows` has the contract of :func:`sftkey.core.divergence.rows` for those two kinds, so the
two-head pass (:mod:`.pair`), its products (``torch.mm``) and its block functions stay the
torch backend's; only the block math runs in the two row kernels."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sftkey.core.divergence import KL_KINDS, RowDivergence
from sftkey.kernels.configs import row_config
from sftkey.kernels.pair_rows import PAIR_STATS, pair_grads_kernel, pair_stats_kernel


def rows(z: Tensor, r: Tensor, kind: str, beta: float = 0.5, g: Optional[Tensor] = None,
         want_dz: bool = True, want_dr: bool = False) -> RowDivergence:
    """:func:`sftkey.core.divergence.rows` for ``kind`` in :data:`sftkey.core.divergence.KL_KINDS`
    (``beta`` unused): ``z``, ``r`` ``[n, V]`` float32 with unit column stride, ``g`` ``[n]``;
    ``dz`` and ``dr`` are written over them."""
    if kind not in KL_KINDS:
        raise ValueError(f"the triton two-head rows take kind in {KL_KINDS}, got {kind!r}")
    if z.dtype != torch.float32 or r.dtype != torch.float32:
        raise TypeError(f"the triton two-head rows take float32 logits, got {z.dtype} and {r.dtype}")
    forward = kind == "forward_kl"
    a, o = (r, z) if forward else (z, r)  # the weighting head first (kernels/pair_rows.py)
    n, V = z.shape
    stats = torch.empty(n, len(PAIR_STATS), dtype=torch.float32, device=z.device)
    value = torch.empty(n, dtype=torch.float32, device=z.device)
    cfg = row_config(z.device)
    launch = dict(BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    pair_stats_kernel[(n,)](a, a.stride(0), o, o.stride(0), stats, value, V, **launch)
    want_dz, want_dr = want_dz and g is not None, want_dr and g is not None
    if want_dz or want_dr:
        want_a, want_o = (want_dr, want_dz) if forward else (want_dz, want_dr)
        pair_grads_kernel[(n,)](a, a.stride(0), o, o.stride(0), stats, g.to(torch.float32).contiguous(), V,
                                WANT_A=want_a, WANT_O=want_o, **launch)
    return RowDivergence(value, z if want_dz else None, r if want_dr else None)
