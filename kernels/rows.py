"""Row kernels of the single pass: the statistics of a group's logits, then its ``dz`` in place.

The logits ``o`` of a group of ``R`` rows come from a matrix product (cuBLAS on CUDA) as an
``[R, V]`` buffer with row stride ``stride_o``, float32 or in the inputs' dtype. Each program
owns one row and walks its ``V`` columns in tiles of ``BLOCK_V``, in order:

* :func:`row_stats_kernel` reads the row once: ``z = o + b`` (soft-capped), and folds each
  tile into the online max ``m``, ``sum_exp = sum exp(z - m)`` and ``t = sum exp(z - m) z``;
  it also takes the target logit, ``Z = sum_j c_j z_j`` (``HAS_Z``), the argmax (first index,
  ``ARGMAX``), and writes ``lse = m + log sum_exp`` and ``S = t / sum_exp`` (``HAS_S``).
  Launched by :func:`row_stats`.
* :func:`row_grads_kernel` reads the row again with the upstream gradients of its
  statistics and writes

      dz = g_lse p + g_S p (1 + z - S) + g_zy [j = y] + g_Z c_j   (times 1 - (z/cap)^2 under softcap)

  with ``p = exp(z - lse)``, in the dtype of ``dz`` (the products' dtype), at ``dz``'s row
  stride; launched by :func:`row_grads`. ``dz`` may overlay ``o``: a narrower dtype over the
  same bytes writes tile ``k`` within the bytes of tiles ``<= k``, which a barrier after each
  tile's loads makes sure every thread of the program has read. Such a ``dz`` row has a gap, columns ``V`` to its
  stride ``stride_dz``, that still holds the bits of ``o``'s second half (some of which read
  as NaN or Inf in the narrower dtype); the program then zeroes it (``gap``: its width) once
  the row is read, so that a matrix product that reads a strided operand's gap (oneDNN's
  bf16 product on AMX does) reads finite values.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import RowConfig
from .logits import softcap_tanh


@triton.jit
def _logits_tile(o_row, cols, col_mask, b, softcap,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """A tile of one row's float32 logits (0 on masked columns before the soft-cap)."""
    z = tl.load(o_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b + cols, mask=col_mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        z = softcap_tanh(z, softcap)
    return z


@triton.jit
def _class_weights(c, cols, col_mask, HAS_C: tl.constexpr):
    """``c_j`` of a tile's columns (ones without class weights), 0 on masked columns."""
    if HAS_C:
        return tl.load(c + cols, mask=col_mask, other=0.0).to(tl.float32)
    return tl.where(col_mask, 1.0, 0.0)


@triton.jit
def row_stats_kernel(o, stride_o, b, y, c, lse_out, zy_out, s_out, z_out, argmax_out,
                     V, softcap,
                     HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, SOFTCAP: tl.constexpr,
                     HAS_S: tl.constexpr, HAS_Z: tl.constexpr, ARGMAX: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o_row = o + row * stride_o
    target = tl.load(y + row).to(tl.int32)
    m = tl.full((), float("-inf"), tl.float32)
    sum_exp = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    zy = tl.zeros((), tl.float32)
    wsum = tl.zeros((), tl.float32)
    best_v = tl.full((), float("-inf"), tl.float32)
    best_i = tl.zeros((), tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(o_row, cols, col_mask, b, softcap, HAS_BIAS, SOFTCAP)
        zm = tl.where(col_mask, z, float("-inf"))
        tile_max = tl.max(zm, 0)
        m_new = tl.maximum(m, tile_max)
        scale = tl.exp(m - m_new)
        e = tl.exp(zm - m_new)
        sum_exp = sum_exp * scale + tl.sum(e, 0)
        if HAS_S:
            t = t * scale + tl.sum(e * z, 0)
        m = m_new
        zy += tl.sum(tl.where(cols == target, z, 0.0), 0)
        if HAS_Z:
            wsum += tl.sum(z * _class_weights(c, cols, col_mask, HAS_C), 0)
        if ARGMAX:
            at = tl.min(tl.where(zm == tile_max, cols, V), 0)
            better = tile_max > best_v
            best_i = tl.where(better, at, best_i)
            best_v = tl.where(better, tile_max, best_v)
    tl.store(lse_out + row, m + tl.log(sum_exp))
    tl.store(zy_out + row, zy)
    if HAS_S:
        tl.store(s_out + row, t / sum_exp)
    if HAS_Z:
        tl.store(z_out + row, wsum)
    if ARGMAX:
        tl.store(argmax_out + row, best_i.to(tl.int64))


@triton.jit
def row_grads_kernel(o, stride_o, dz, stride_dz, b, y, c, lse, s_exp, g_lse, g_zy, g_s, g_z,
                     V, gap, softcap,
                     HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, SOFTCAP: tl.constexpr,
                     HAS_GLSE: tl.constexpr, HAS_GZY: tl.constexpr, HAS_GS: tl.constexpr,
                     HAS_GZ: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o_row = o + row * stride_o
    dz_row = dz + row * stride_dz
    lse_r = tl.load(lse + row)
    if HAS_GLSE:
        k_lse = tl.load(g_lse + row)
    if HAS_GS:
        k_s = tl.load(g_s + row)
        s_r = tl.load(s_exp + row)
    target = tl.load(y + row).to(tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(o_row, cols, col_mask, b, softcap, HAS_BIAS, SOFTCAP)
        tl.debug_barrier()  # every thread has read the tile before any writes over it
        p = tl.exp(z - lse_r)
        g = tl.zeros((BLOCK_V,), tl.float32)
        if HAS_GLSE:
            g += p * k_lse
        if HAS_GS:
            g += p * k_s * (1.0 + z - s_r)
        if HAS_GZY:
            g += tl.where(cols == target, tl.load(g_zy + row), 0.0)
        if HAS_GZ:
            g += tl.load(g_z + row) * _class_weights(c, cols, col_mask, HAS_C)
        if SOFTCAP:
            capped = z / softcap
            g = g * (1.0 - capped * capped)
        tl.store(dz_row + cols, g.to(dz.dtype.element_ty), mask=col_mask)
    for v0 in range(V, V + gap, BLOCK_V):  # the row is read: zero the gap of an overlaid dz
        cols = v0 + tl.arange(0, BLOCK_V)
        tl.store(dz_row + cols, tl.zeros((BLOCK_V,), dz.dtype.element_ty), mask=cols < V + gap)


def _flags(b, c, softcap) -> dict:
    return dict(HAS_BIAS=b is not None, HAS_C=c is not None, SOFTCAP=softcap is not None)


def row_stats(o: torch.Tensor, y: torch.Tensor, b: Optional[torch.Tensor], c: Optional[torch.Tensor],
              softcap: Optional[float], with_s: bool, with_z: bool, with_argmax: bool, cfg: RowConfig) -> tuple:
    """``(lse, zy, S, Z, argmax)`` of the rows of ``o`` ``[R, V]`` (unit column stride) with the
    bias ``b`` ``[V]`` and the soft-cap, targets ``y`` ``[R]`` (-1: none), class weights ``c``
    ``[V]`` float32 or None: float32 ``[R]`` each (argmax int64), ``S``, ``Z`` and the argmax
    None where not asked for. One program per row."""
    rows, dev = o.shape[0], o.device
    lse, zy = (torch.empty(rows, dtype=torch.float32, device=dev) for _ in range(2))
    S = torch.empty_like(lse) if with_s else None
    Z = torch.empty_like(lse) if with_z else None
    argmax = torch.empty(rows, dtype=torch.int64, device=dev) if with_argmax else None
    row_stats_kernel[(rows,)](
        o, o.stride(0), b if b is not None else o, y, c if c is not None else lse, lse, zy,
        *(t if t is not None else lse for t in (S, Z, argmax)), o.shape[1], float(softcap or 1.0),
        HAS_S=with_s, HAS_Z=with_z, ARGMAX=with_argmax, **_flags(b, c, softcap),
        BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    return lse, zy, S, Z, argmax


def row_grads(o: torch.Tensor, dz: torch.Tensor, y: torch.Tensor, b: Optional[torch.Tensor],
              c: Optional[torch.Tensor], softcap: Optional[float], lse: torch.Tensor, s_exp: Optional[torch.Tensor],
              grads: tuple, cfg: RowConfig) -> None:
    """``dz`` of the rows of ``o`` (as :func:`row_stats`'s) for the upstream ``grads`` ``(g_lse,
    g_zy, g_S, g_Z)`` (``[R]`` each or None), written into ``dz`` ``[R, V]``: ``o`` itself, or a
    narrower view over its bytes at its row stride, whose gap (columns ``V`` to the stride) is
    then zeroed."""
    g = [None if t is None else t.float().contiguous() for t in grads]
    gap = dz.stride(0) - o.shape[1] if dz.element_size() < o.element_size() else 0
    row_grads_kernel[(o.shape[0],)](
        o, o.stride(0), dz, dz.stride(0), b if b is not None else o, y, c if c is not None else lse, lse,
        s_exp if s_exp is not None else lse, *(t if t is not None else lse for t in g),
        o.shape[1], gap, float(softcap or 1.0),
        HAS_GLSE=g[0] is not None, HAS_GZY=g[1] is not None, HAS_GS=g[2] is not None, HAS_GZ=g[3] is not None,
        **_flags(b, c, softcap), BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
