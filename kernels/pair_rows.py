"""Row kernels of the two-head pass for the forward and reverse KL: a block's statistics from
both heads' logits, then their gradients in place (docs/design.md, "Two heads").

Both KLs are one formula in a *weighting* head ``a`` and the *other* head ``o``:
``D = KL(softmax(a) || softmax(o))`` (forward KL ``KL(q || p)``: ``a = r``, ``o = z``; reverse
KL ``KL(p || q)``: ``a = z``, ``o = r``). As in :mod:`sftkey.core.divergence` ("At large
logits"), every term is taken relative to the argmax ``k`` of ``a``, so that the gradient of
the dominant entry keeps its precision at logits in the hundreds:

    delta_j = (a_j - a_k) - (o_j - o_k)    E = sum_j pa_j delta_j    D = E + (m_o - o_k) + log s_o - log s_a
    d_a = g pa (delta - E)                  d_o = g (po - pa)

(``s_a = sum_j exp(a_j - a_k)``, ``pa = exp(a - a_k) / s_a``, ``m_o`` the maximum of ``o``,
``s_o = sum_j exp(o_j - m_o)``, ``po = exp(o - m_o) / s_o``, ``g`` the row's upstream
gradient). The logits are ``[n, V]`` float32 buffers (the block's, temperature and soft-cap
applied), rows at strides ``stride_a``, ``stride_o``, unit column stride. Each program owns
one row and walks its ``V`` columns in tiles of ``BLOCK_V``, elementwise and reductions
only (no ``tl.dot``):

* :func:`pair_stats_kernel` reads both rows once: the running maximum of ``a`` and ``o`` at
  it, the maximum of ``o``, the sums of ``exp`` of each, and ``t = sum exp(a - a_k) delta``,
  rescaled (and shifted) when the maximum moves; it writes ``D`` and the row's
  :data:`PAIR_STATS` ``(a_k, log s_a, o_k, m_o, log s_o, E)``.
* :func:`pair_grads_kernel` reads both rows again and writes ``d_a`` over ``a`` (``WANT_A``)
  and ``d_o`` over ``o`` (``WANT_O``): each element is read and written by the same thread.

:func:`kl_rows` launches both.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import RowConfig

#: The per-row values :func:`pair_stats_kernel` writes for :func:`pair_grads_kernel`, in order.
PAIR_STATS = ("a_max", "log_sum_a", "o_at_a_max", "o_max", "log_sum_o", "gap")


@triton.jit
def _chunk(row, cols, col_mask):
    return tl.load(row + cols, mask=col_mask, other=0.0).to(tl.float32)


@triton.jit
def pair_stats_kernel(a, stride_a, o, stride_o, stats_out, d_out, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a + row * stride_a
    o_row = o + row * stride_o
    m_a = tl.full((), float("-inf"), tl.float32)
    o_k = tl.zeros((), tl.float32)
    m_o = tl.full((), float("-inf"), tl.float32)
    sum_a = tl.zeros((), tl.float32)
    sum_o = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        za = _chunk(a_row, cols, col_mask)
        zo = _chunk(o_row, cols, col_mask)
        am = tl.where(col_mask, za, float("-inf"))
        om = tl.where(col_mask, zo, float("-inf"))
        chunk_max = tl.max(am, 0)
        o_at = tl.max(tl.where(am == chunk_max, zo, float("-inf")), 0)
        moved = chunk_max > m_a
        ma_new = tl.where(moved, chunk_max, m_a)
        ok_new = tl.where(moved, o_at, o_k)
        # the earlier terms' delta shifts by (o_k' - o_k) - (a_k' - a_k) with the new argmax
        scale_a = tl.exp(m_a - ma_new)
        shift = (ok_new - o_k) - (ma_new - m_a)
        ea = tl.exp(am - ma_new)
        delta = (za - ma_new) - (zo - ok_new)
        t = (t + tl.where(moved & (sum_a > 0), sum_a * shift, 0.0)) * scale_a
        t += tl.sum(tl.where(col_mask, ea * delta, 0.0), 0)
        sum_a = sum_a * scale_a + tl.sum(ea, 0)
        mo_new = tl.maximum(m_o, tl.max(om, 0))
        sum_o = sum_o * tl.exp(m_o - mo_new) + tl.sum(tl.exp(om - mo_new), 0)
        m_a = ma_new
        o_k = ok_new
        m_o = mo_new
    log_sum_a = tl.log(sum_a)
    log_sum_o = tl.log(sum_o)
    gap = t / sum_a
    out = stats_out + row * 6  # PAIR_STATS
    tl.store(out, m_a)
    tl.store(out + 1, log_sum_a)
    tl.store(out + 2, o_k)
    tl.store(out + 3, m_o)
    tl.store(out + 4, log_sum_o)
    tl.store(out + 5, gap)
    tl.store(d_out + row, gap + ((m_o - o_k) + log_sum_o - log_sum_a))


@triton.jit
def pair_grads_kernel(a, stride_a, o, stride_o, stats, g, V,
                      WANT_A: tl.constexpr, WANT_O: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a + row * stride_a
    o_row = o + row * stride_o
    at = stats + row * 6  # PAIR_STATS
    m_a = tl.load(at)
    log_sum_a = tl.load(at + 1)
    o_k = tl.load(at + 2)
    m_o = tl.load(at + 3)
    log_sum_o = tl.load(at + 4)
    gap = tl.load(at + 5)
    g_r = tl.load(g + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        za = _chunk(a_row, cols, col_mask) - m_a
        zo = _chunk(o_row, cols, col_mask)
        pa = tl.exp(za - log_sum_a)
        if WANT_A:
            da = g_r * pa * ((za - (zo - o_k)) - gap)
            tl.store(a_row + cols, da.to(a.dtype.element_ty), mask=col_mask)
        if WANT_O:
            do = g_r * (tl.exp((zo - m_o) - log_sum_o) - pa)
            tl.store(o_row + cols, do.to(o.dtype.element_ty), mask=col_mask)


def kl_rows(z: torch.Tensor, r: torch.Tensor, kind: str, g: Optional[torch.Tensor], want_dz: bool, want_dr: bool,
            cfg: RowConfig) -> tuple:
    """``(D, dz, dr)`` of the policy rows ``z`` and reference rows ``r`` (``[n, V]`` float32, unit
    column stride, temperature applied) for ``kind`` in :data:`sftkey.core.divergence.KL_KINDS`: ``D`` ``[n]`` float32,
    and where ``g`` ``[n]`` is given, ``g_i dD_i/dz`` written over ``z`` (``want_dz``) and
    ``g_i dD_i/dr`` over ``r`` (``want_dr``), else None."""
    forward = kind == "forward_kl"
    a, o = (r, z) if forward else (z, r)  # the weighting head first
    n, V = z.shape
    stats = torch.empty(n, len(PAIR_STATS), dtype=torch.float32, device=z.device)
    value = torch.empty(n, dtype=torch.float32, device=z.device)
    launch = dict(BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    pair_stats_kernel[(n,)](a, a.stride(0), o, o.stride(0), stats, value, V, **launch)
    want_dz, want_dr = want_dz and g is not None, want_dr and g is not None
    if want_dz or want_dr:
        want_a, want_o = (want_dr, want_dz) if forward else (want_dz, want_dr)
        pair_grads_kernel[(n,)](a, a.stride(0), o, o.stride(0), stats, g.to(torch.float32).contiguous(), V,
                                WANT_A=want_a, WANT_O=want_o, **launch)
    return value, z if want_dz else None, r if want_dr else None
