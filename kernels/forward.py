"""Forward kernel: partial per-row statistics of the logits over one split of the vocabulary.

Tiles: each program owns ``BLOCK_N`` rows of X and one split of the vocabulary
(``tiles_per_split`` consecutive tiles of ``BLOCK_V`` columns). For each tile it forms
``z = X_rows W_tile^T (+ b)`` (soft-capped) as a ``BLOCK_N x BLOCK_V`` fp32 block from
``BLOCK_D``-wide slices of X and W, and folds it into running per-row values: the max ``m``,
``sum_exp = sum exp(z - m)``, ``t = sum exp(z - m) z`` (both rescaled when ``m`` grows), the target
logit ``zy``, ``Z = sum_j c_j z_j``, the argmax (value, first index) and the top-k logits.
It writes these ``O(BLOCK_N)`` partials for its split; the host merges the splits
(``lse = m + log sum_exp``, ``S = t / sum_exp``), so several programs can share a row block's vocabulary
when there are few row blocks.

:func:`forward` launches it and merges the splits.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import KernelConfig, tile_args, topk_config
from .logits import logits_tile


@triton.jit
def _merge_topk(run, zm, cols_local, kk, TOPK: tl.constexpr, K_PAD: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """The ``TOPK`` largest of the running top-k ``run`` [BLOCK_N, K_PAD] and the tile ``zm``."""
    new = tl.full(run.shape, float("-inf"), tl.float32)
    for r in tl.static_range(TOPK):
        run_max = tl.max(run, 1)
        tile_max = tl.max(zm, 1)
        from_run = run_max >= tile_max
        new = tl.where(kk[None, :] == r, tl.where(from_run, run_max, tile_max)[:, None], new)
        run_at = tl.min(tl.where(run == run_max[:, None], kk[None, :], K_PAD), 1)
        run = tl.where(from_run[:, None] & (kk[None, :] == run_at[:, None]), float("-inf"), run)
        tile_at = tl.min(tl.where(zm == tile_max[:, None], cols_local[None, :], BLOCK_V), 1)
        zm = tl.where(~from_run[:, None] & (cols_local[None, :] == tile_at[:, None]), float("-inf"), zm)
    return new


@triton.jit
def forward_kernel(x, w, b, y, c,
                   m_out, sum_exp_out, t_out, zy_out, wsum_out, amax_v_out, amax_i_out, topk_out,
                   N, V, D, tiles_per_split, softcap,
                   HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, SOFTCAP: tl.constexpr,
                   TOPK: tl.constexpr, K_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    split = pid // num_n

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    x_rows = x + rows64 * D
    yt = tl.load(y + rows64, mask=row_mask, other=-1).to(tl.int32)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    wsum = tl.zeros((BLOCK_N,), tl.float32)
    best_v = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_i = tl.zeros((BLOCK_N,), tl.int32)
    kk = tl.arange(0, K_PAD)
    run = tl.full((BLOCK_N, K_PAD), float("-inf"), tl.float32)

    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols_local = tl.arange(0, BLOCK_V)
        cols = v0 + cols_local
        col_mask = cols < V
        z = logits_tile(x_rows, row_mask, w, cols, col_mask, b, D, softcap,
                        HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PREC)
        # z is 0 on masked columns; zm excludes them from max, sum-exp and argmax.
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(zm, 1)
        m_new = tl.maximum(m, tile_max)
        scale = tl.exp(m - m_new)
        e = tl.exp(zm - m_new[:, None])
        sum_exp = sum_exp * scale + tl.sum(e, 1)
        t = t * scale + tl.sum(e * z, 1)
        m = m_new

        zy += tl.sum(tl.where(cols[None, :] == yt[:, None], z, 0.0), 1)
        if HAS_C:
            wsum += tl.sum(z * tl.load(c + cols, mask=col_mask, other=0.0)[None, :], 1)
        else:
            wsum += tl.sum(z, 1)

        tile_at = tl.min(tl.where(zm == tile_max[:, None], cols[None, :], V), 1)
        better = tile_max > best_v
        best_i = tl.where(better, tile_at, best_i)
        best_v = tl.where(better, tile_max, best_v)
        if TOPK > 0:
            run = _merge_topk(run, zm, cols_local, kk, TOPK, K_PAD, BLOCK_V)

    out = split.to(tl.int64) * N + rows64
    tl.store(m_out + out, m, mask=row_mask)
    tl.store(sum_exp_out + out, sum_exp, mask=row_mask)
    tl.store(t_out + out, t, mask=row_mask)
    tl.store(zy_out + out, zy, mask=row_mask)
    tl.store(wsum_out + out, wsum, mask=row_mask)
    tl.store(amax_v_out + out, best_v, mask=row_mask)
    tl.store(amax_i_out + out, best_i.to(tl.int64), mask=row_mask)
    if TOPK > 0:
        tl.store(topk_out + out[:, None] * TOPK + kk[None, :], run,
                 mask=row_mask[:, None] & (kk[None, :] < TOPK))


def forward(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor, c: Optional[torch.Tensor],
            softcap: Optional[float], topk: int, cfg: KernelConfig, vocab_splits: Optional[int] = None) -> tuple:
    """Every statistic of the rows of ``x`` ``[N, D]`` (contiguous; ``w`` ``[V, D]``, ``b`` ``[V]``
    in its dtype, ``y`` ``[N]`` int64 with -1 for no target, ``c`` ``[V]`` or None): ``(lse,
    zy, S, Z, argmax, top)``, float32 (argmax int64, ``top`` ``[N, topk]`` or None).

    Programs: ``ceil(N / BLOCK_N)`` row blocks times the vocabulary splits, enough splits for
    ``cfg.occupancy`` programs per SM on CUDA (``vocab_splits`` fixes them; above 16 top-k logits
    half the rows per tile, :func:`~.configs.topk_config`); the splits' partial
    statistics merge here: ``lse = M + log sum_s l_s e^{m_s - M}``, ``S = sum_s t_s e^{m_s - M}``
    over that sum, the argmax from the first split holding the maximum."""
    (n, d), v = x.shape, w.shape[0]
    cfg = topk_config(cfg, topk)
    f32 = dict(dtype=torch.float32, device=x.device)
    if n == 0:
        empty = torch.empty(0, **f32)
        return (empty, empty, empty, empty, torch.empty(0, dtype=torch.int64, device=x.device),
                torch.empty(0, topk, **f32) if topk else None)
    num_n, num_tiles = triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v)
    if vocab_splits is None:
        occupied = x.is_cuda and cfg.occupancy
        vocab_splits = triton.cdiv(torch.cuda.get_device_properties(x.device).multi_processor_count * cfg.occupancy,
                                   num_n) if occupied else 1
    tiles_per_split = triton.cdiv(num_tiles, max(1, min(vocab_splits, num_tiles)))
    splits = triton.cdiv(num_tiles, tiles_per_split)

    m, sum_exp, t, zy, wsum, amax_v = (torch.empty(splits, n, **f32) for _ in range(6))
    amax_i = torch.empty(splits, n, dtype=torch.int64, device=x.device)
    top = torch.empty(splits, n, topk, **f32) if topk else m
    cvec = c.float() if c is not None else None
    forward_kernel[(num_n * splits,)](
        x, w, b if b is not None else x, y, cvec if cvec is not None else m,
        m, sum_exp, t, zy, wsum, amax_v, amax_i, top,
        n, v, d, tiles_per_split, float(softcap or 1.0),
        HAS_BIAS=b is not None, HAS_C=c is not None, SOFTCAP=softcap is not None,
        TOPK=topk, K_PAD=triton.next_power_of_2(max(topk, 1)), **tile_args(x, cfg))

    mx = m.max(0).values
    scale = torch.exp(m - mx)
    lsum = (sum_exp * scale).sum(0)
    best = amax_v.argmax(0, keepdim=True)  # the first split holding the max: the first index overall
    top_values = top.permute(1, 0, 2).reshape(n, -1).topk(topk, dim=1).values if topk else None
    return (mx + torch.log(lsum), zy.sum(0), (t * scale).sum(0) / lsum, wsum.sum(0),
            amax_i.gather(0, best).squeeze(0), top_values)
