"""The logits as the kernels form them, shared by every kernel file: the soft-cap, and one
``BLOCK_N x BLOCK_V`` tile of ``z = X W^T (+ b)`` from ``BLOCK_D``-wide operand slices."""
import triton
import triton.language as tl


@triton.jit
def softcap_tanh(z, cap):
    """``cap * tanh(z / cap)`` through ``exp`` (``tl.math.tanh`` differs across Triton versions)."""
    e = tl.exp(-2.0 * tl.abs(z) / cap)
    th = (1.0 - e) / (1.0 + e)
    return cap * tl.where(z < 0, -th, th)


@triton.jit
def logits_tile(x_rows, row_mask, w, cols, col_mask, b, D, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """The fp32 ``[BLOCK_N, BLOCK_V]`` logits of rows ``x_rows`` (row pointers) and vocab ``cols``.

    Masked rows and columns come out as 0 (before the soft-cap, which keeps 0). ``UPCAST``:
    the operand slices go to fp32 before ``tl.dot`` (the interpreter's bf16 dot is wrong)."""
    w_cols = w + cols.to(tl.int64) * D
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        d_mask = dk < D
        xt = tl.load(x_rows[:, None] + dk[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        wt = tl.load(w_cols[None, :] + dk[:, None], mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc=acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap_tanh(acc, softcap)
    return acc
