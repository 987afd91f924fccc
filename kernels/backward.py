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
"""
import triton
import triton.language as tl

from .forward import logits_tile


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
