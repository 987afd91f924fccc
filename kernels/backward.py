"""Backward kernel: recompute one logits tile, form ``dz``, accumulate ``dX``, ``dW``, ``db``.

Tiles: each program owns one ``BLOCK_N x BLOCK_V`` tile of the (never stored) logits: rows
``pid_n`` and vocabulary block ``pid_v``, launched in groups of ``GROUP_N`` row blocks so
that neighbouring programs share W tiles in L2. It recomputes ``z`` from ``BLOCK_D``-wide
slices (fp32 accumulation), forms

    dz = g_lse p + g_S p (1 + z - S)  [+ g_zy [j = y] + g_Z c_j]  (times 1 - (z/cap)^2 under softcap)

with ``p = exp(z - lse)``; the bracketed terms are dense only under a softcap (otherwise
the host adds them as a scatter and a rank-one product). It then adds ``dz W_tile`` into the
rows of ``dX``, ``dz^T X_rows`` into the tile's rows of ``dW`` and the column sums of ``dz``
into ``db``, ``BLOCK_D`` columns at a time, with float32 atomics (every tile of a row
contributes to its ``dX`` row, every row block to a ``dW`` row). With ``FILTER``, a tile whose
``p`` are all below ``filter_eps`` (and holds no dense one-hot term) is skipped.

:func:`backward` launches it and adds the one-hot and rank-one parts on the host.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import KernelConfig, tile_args
from .logits import logits_tile

_CHUNK_ROWS = 8192  # rows per host-side vector-matrix product (converted to float32 at a time)


@triton.jit
def backward_kernel(x, w, b, y, c, lse, s_exp, g_lse, g_zy, g_s, g_z, dx, dw, db,
                    N, V, D, softcap, filter_eps,
                    HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, SOFTCAP: tl.constexpr,
                    HAS_GLSE: tl.constexpr, HAS_GS: tl.constexpr,
                    DENSE_GZY: tl.constexpr, DENSE_GZ: tl.constexpr,
                    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                    FILTER: tl.constexpr, GROUP_N: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    x_rows = x + rows64 * D
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]

    z = logits_tile(x_rows, row_mask, w, cols, col_mask, b, D, softcap,
                    HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PREC)
    lse_r = tl.load(lse + rows64, mask=row_mask, other=0.0)
    p = tl.where(tile_mask, tl.exp(z - lse_r[:, None]), 0.0)

    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_GLSE:
        dz += p * tl.load(g_lse + rows64, mask=row_mask, other=0.0)[:, None]
    if HAS_GS:
        s_r = tl.load(s_exp + rows64, mask=row_mask, other=0.0)
        g_s_r = tl.load(g_s + rows64, mask=row_mask, other=0.0)
        dz += p * g_s_r[:, None] * (1.0 + z - s_r[:, None])
    is_target = cols[None, :] == tl.load(y + rows64, mask=row_mask, other=-1).to(tl.int32)[:, None]
    if DENSE_GZY:
        dz += tl.where(is_target, tl.load(g_zy + rows64, mask=row_mask, other=0.0)[:, None], 0.0)
    if DENSE_GZ:
        if HAS_C:
            c_j = tl.load(c + cols, mask=col_mask, other=0.0)
        else:
            c_j = tl.where(col_mask, 1.0, 0.0)
        dz += c_j[None, :] * tl.load(g_z + rows64, mask=row_mask, other=0.0)[:, None]
    if SOFTCAP:
        tanh_z = z / softcap
        dz = dz * (1.0 - tanh_z * tanh_z)

    if FILTER:
        keep = tl.max(tl.max(p, 1), 0) >= filter_eps
        if DENSE_GZY:
            keep = keep | (tl.sum(tl.sum(is_target.to(tl.int32), 1), 0) > 0)
    else:
        keep = True
    if keep:
        if NEED_DB:
            tl.atomic_add(db + cols, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        dz_in = dz.to(x.dtype.element_ty)
        if UPCAST:
            dz_in = dz_in.to(tl.float32)
        w_cols = w + cols.to(tl.int64) * D
        dw_cols = dw + cols.to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            d_mask = dk < D
            if NEED_DX:
                wt = tl.load(w_cols[:, None] + dk[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    wt = wt.to(tl.float32)
                part = tl.dot(dz_in, wt, input_precision=DOT_PREC)
                tl.atomic_add(dx + rows64[:, None] * D + dk[None, :], part,
                              mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
            if NEED_DW:
                xt = tl.load(x_rows[:, None] + dk[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                part = tl.dot(tl.trans(dz_in), xt, input_precision=DOT_PREC)
                tl.atomic_add(dw_cols[:, None] + dk[None, :], part,
                              mask=col_mask[:, None] & d_mask[None, :], sem="relaxed")


def _vecmat(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``v @ m`` in float32 (``v`` [R] float32, ``m`` [R, D]), converting ``_CHUNK_ROWS`` rows at a time."""
    out = torch.zeros(m.shape[1], dtype=torch.float32, device=m.device)
    for s in range(0, m.shape[0], _CHUNK_ROWS):
        out += v[s:s + _CHUNK_ROWS] @ m[s:s + _CHUNK_ROWS].float()
    return out


def backward(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor, c: Optional[torch.Tensor],
             softcap: Optional[float], lse: torch.Tensor, s_exp: Optional[torch.Tensor], grads: tuple,
             needs: tuple, filter_eps: Optional[float], cfg: KernelConfig) -> tuple:
    """``(dX, dW, db)`` in float32 (None where ``needs`` says no) for the upstream ``grads``
    ``(g_lse, g_zy, g_S, g_Z)`` (each float32 ``[N]`` or None) of the rows of ``x`` ``[N, D]``
    (as :func:`sftkey.kernels.forward.forward`'s inputs; ``lse`` and, with ``g_S``, ``S`` of the
    full rows). The kernel forms the dense part of ``dz``; without a soft-cap the one-hot
    part ``g_zy [j = y]`` is a gather/scatter here and the ``g_Z c_j`` part a rank-one product."""
    (n, d), v = x.shape, w.shape[0]
    grads = tuple(None if g is None else g.float().contiguous() for g in grads)
    g_lse, g_zy, g_s, g_z = grads
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.zeros(n, d, **f32) if needs[0] else None
    dw = torch.zeros(v, d, **f32) if needs[1] else None
    db = torch.zeros(v, **f32) if needs[2] and b is not None else None
    cvec = c.float() if c is not None else None
    dense_gzy, dense_gz = softcap is not None and g_zy is not None, softcap is not None and g_z is not None
    dense = g_lse is not None or g_s is not None or dense_gzy or dense_gz
    if n and (dx is not None or dw is not None or db is not None) and dense:
        dummy = lse = lse.float().contiguous()
        s_exp = s_exp.float().contiguous() if g_s is not None else lse
        backward_kernel[(triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)](
            x, w, b if b is not None else x, y, cvec if cvec is not None else dummy, lse, s_exp,
            *(g if g is not None else dummy for g in grads),
            dx if dx is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
            n, v, d, float(softcap or 1.0), float(filter_eps or 0.0),
            HAS_BIAS=b is not None, HAS_C=c is not None, SOFTCAP=softcap is not None,
            HAS_GLSE=g_lse is not None, HAS_GS=g_s is not None, DENSE_GZY=dense_gzy, DENSE_GZ=dense_gz,
            NEED_DX=dx is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
            FILTER=filter_eps is not None and not dense_gz, GROUP_N=cfg.group_n, **tile_args(x, cfg))
    if n and g_zy is not None and not dense_gzy:  # dz_{i, y_i} += g_zy_i (no target, y = -1: nothing)
        valid = y >= 0
        yc, g = torch.where(valid, y, 0), torch.where(valid, g_zy, 0.0)
        if dx is not None:
            dx.addcmul_(g[:, None], w[yc])
        if dw is not None:
            dw.index_add_(0, yc, x * g[:, None])
        if db is not None:
            db.index_add_(0, yc, g)
    if n and g_z is not None and not dense_gz:  # dz_ij += g_Z_i c_j
        if dx is not None:
            dx.addr_(g_z, _vecmat(cvec, w) if cvec is not None else w.sum(0, dtype=torch.float32))
        if dw is not None:
            u = _vecmat(g_z, x)
            if cvec is None:
                dw += u
            else:
                dw.addr_(cvec, u)
        if db is not None:
            db.add_(g_z.sum() if cvec is None else cvec * g_z.sum())
    return dx, dw, db
