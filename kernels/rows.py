"""Row kernels of the single pass: the statistics of a group's logits, then its ``dz`` in place.

The logits ``o`` of a group of ``R`` rows come from a matrix product (cuBLAS on CUDA) as an
``[R, V]`` buffer with row stride ``stride_o``, float32 or in the inputs' dtype. Each program
owns one row and walks its ``V`` columns in ``BLOCK_V``-wide chunks, in order:

* :func:`row_stats_kernel` reads the row once: ``z = o + b`` (soft-capped), and folds each
  chunk into the online max ``m``, ``sum_exp = sum exp(z - m)`` and ``t = sum exp(z - m) z``;
  it also takes the target logit, ``Z = sum_j c_j z_j`` (``HAS_Z``), the argmax (first index,
  ``ARGMAX``), and writes ``lse = m + log sum_exp`` and ``S = t / sum_exp`` (``HAS_S``).
* :func:`row_grads_kernel` reads the row again with the upstream gradients of its
  statistics and writes

      dz = g_lse p + g_S p (1 + z - S) + g_zy [j = y] + g_Z c_j   (times 1 - (z/cap)^2 under softcap)

  with ``p = exp(z - lse)``, in the dtype of ``dz`` (the products' dtype), at ``dz``'s row
  stride. ``dz`` may overlay ``o``: a narrower dtype over the same bytes writes chunk ``k``
  within the bytes of chunks ``<= k``, which a barrier after each chunk's loads makes sure
  every thread of the program has read. Such a ``dz`` row has a gap, columns ``V`` to its
  stride ``stride_dz``, that still holds the bits of ``o``'s second half (some of which read
  as NaN or Inf in the narrower dtype); the program then zeroes it (``gap``: its width) once
  the row is read, so that a matrix product that reads a strided operand's gap (oneDNN's
  bf16 product on AMX does) reads finite values.
"""
import triton
import triton.language as tl

from .forward import softcap_tanh


@triton.jit
def _logits_chunk(o_row, cols, col_mask, b, softcap,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """A chunk of one row's float32 logits (0 on masked columns before the soft-cap)."""
    z = tl.load(o_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b + cols, mask=col_mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        z = softcap_tanh(z, softcap)
    return z


@triton.jit
def _class_weights(c, cols, col_mask, HAS_C: tl.constexpr):
    """``c_j`` of a chunk's columns (ones without class weights), 0 on masked columns."""
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
        z = _logits_chunk(o_row, cols, col_mask, b, softcap, HAS_BIAS, SOFTCAP)
        zm = tl.where(col_mask, z, float("-inf"))
        chunk_max = tl.max(zm, 0)
        m_new = tl.maximum(m, chunk_max)
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
            at = tl.min(tl.where(zm == chunk_max, cols, V), 0)
            better = chunk_max > best_v
            best_i = tl.where(better, at, best_i)
            best_v = tl.where(better, chunk_max, best_v)
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
        z = _logits_chunk(o_row, cols, col_mask, b, softcap, HAS_BIAS, SOFTCAP)
        tl.debug_barrier()  # every thread has read the chunk before any writes over it
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
