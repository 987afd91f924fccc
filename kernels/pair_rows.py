"""Row kernels of the two-head pass for the forward and reverse KL: a block's statistics from
both heads' logits, then their gradients in place (docs/design.md, "Two heads").

Both KLs are one formula in a *weighting* head ``a`` and the *other* head ``o``:
``KL(softmax(a) || softmax(o)) = E_a[a - o] - lse_a + lse_o`` (forward KL ``KL(q || p)``:
``a = r``, ``o = z``; reverse KL ``KL(p || q)``: ``a = z``, ``o = r``), with gradients

    d_a = g pa (log pa - log po - D)      d_o = g (po - pa)

(``pa = exp(a - lse_a)``, ``po = exp(o - lse_o)``, ``g`` the row's upstream gradient). The
logits are ``[n, V]`` float32 buffers (the block's, temperature and soft-cap applied), rows
at strides ``stride_a``, ``stride_o``, unit column stride. Each program owns one row and
walks its ``V`` columns in ``BLOCK_V``-wide chunks, elementwise and reductions only (no
``tl.dot``):

* :func:`pair_stats_kernel` reads both rows once: online maxima and sums of ``exp`` of each,
  and ``t = sum exp(a - m_a) (a - o)`` rescaled with ``a``'s running max; it writes
  ``lse_a``, ``lse_o`` and ``D = t / sum_a - lse_a + lse_o``.
* :func:`pair_grads_kernel` reads both rows again and writes ``d_a`` over ``a`` (``WANT_A``)
  and ``d_o`` over ``o`` (``WANT_O``): each element is read and written by the same thread.

:func:`kl_rows` launches both.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import RowConfig


@triton.jit
def _chunk(row, cols, col_mask):
    return tl.load(row + cols, mask=col_mask, other=0.0).to(tl.float32)


@triton.jit
def pair_stats_kernel(a, stride_a, o, stride_o, lse_a_out, lse_o_out, d_out, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a + row * stride_a
    o_row = o + row * stride_o
    m_a = tl.full((), float("-inf"), tl.float32)
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
        ma_new = tl.maximum(m_a, tl.max(am, 0))
        mo_new = tl.maximum(m_o, tl.max(om, 0))
        scale_a = tl.exp(m_a - ma_new)
        ea = tl.exp(am - ma_new)
        sum_a = sum_a * scale_a + tl.sum(ea, 0)
        t = t * scale_a + tl.sum(ea * (za - zo), 0)
        sum_o = sum_o * tl.exp(m_o - mo_new) + tl.sum(tl.exp(om - mo_new), 0)
        m_a = ma_new
        m_o = mo_new
    lse_a = m_a + tl.log(sum_a)
    lse_o = m_o + tl.log(sum_o)
    tl.store(lse_a_out + row, lse_a)
    tl.store(lse_o_out + row, lse_o)
    tl.store(d_out + row, t / sum_a - lse_a + lse_o)


@triton.jit
def pair_grads_kernel(a, stride_a, o, stride_o, lse_a, lse_o, d, g, V,
                      WANT_A: tl.constexpr, WANT_O: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a + row * stride_a
    o_row = o + row * stride_o
    la = tl.load(lse_a + row)
    lo = tl.load(lse_o + row)
    d_r = tl.load(d + row)
    g_r = tl.load(g + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        log_pa = _chunk(a_row, cols, col_mask) - la
        log_po = _chunk(o_row, cols, col_mask) - lo
        pa = tl.exp(log_pa)
        if WANT_A:
            da = g_r * pa * (log_pa - log_po - d_r)
            tl.store(a_row + cols, da.to(a.dtype.element_ty), mask=col_mask)
        if WANT_O:
            do = g_r * (tl.exp(log_po) - pa)
            tl.store(o_row + cols, do.to(o.dtype.element_ty), mask=col_mask)


#: The kinds these kernels compute (of :data:`sftkey.core.divergence.KINDS`).
KL_KINDS = ("forward_kl", "reverse_kl")


def kl_rows(z: torch.Tensor, r: torch.Tensor, kind: str, g: Optional[torch.Tensor], want_dz: bool, want_dr: bool,
            cfg: RowConfig) -> tuple:
    """``(D, dz, dr)`` of the policy rows ``z`` and reference rows ``r`` (``[n, V]`` float32, unit
    column stride, temperature applied) for ``kind`` in :data:`KL_KINDS`: ``D`` ``[n]`` float32,
    and where ``g`` ``[n]`` is given, ``g_i dD_i/dz`` written over ``z`` (``want_dz``) and
    ``g_i dD_i/dr`` over ``r`` (``want_dr``), else None."""
    forward = kind == "forward_kl"
    a, o = (r, z) if forward else (z, r)  # the weighting head first
    n, V = z.shape
    lse_a, lse_o, value = (torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(3))
    launch = dict(BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    pair_stats_kernel[(n,)](a, a.stride(0), o, o.stride(0), lse_a, lse_o, value, V, **launch)
    want_dz, want_dr = want_dz and g is not None, want_dr and g is not None
    if want_dz or want_dr:
        want_a, want_o = (want_dr, want_dz) if forward else (want_dz, want_dr)
        pair_grads_kernel[(n,)](a, a.stride(0), o, o.stride(0), lse_a, lse_o, value, g.to(torch.float32).contiguous(),
                                V, WANT_A=want_a, WANT_O=want_o, **launch)
    return value, z if want_dz else None, r if want_dr else None
