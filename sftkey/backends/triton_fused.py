"""The fused Triton backend (``backend="triton-fused"``): launches :mod:`sftkey.kernels` on CUDA, or on the CPU through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before importing Triton.

A head's ``rows`` are gathered first (the kernels read contiguous rows of X).

Forward: one kernel writes per-split partial statistics (row blocks x vocabulary splits, so
a small ``N`` still fills the GPU); the host merges splits in ``O(N * splits)``.
Backward: one kernel over logits tiles adds the dense ``p``-proportional part of ``dz`` into
float32 ``dX``/``dW``/``db`` buffers with atomics; without a softcap, the one-hot ``g_zy`` and
rank-one ``g_Z c`` parts are added here with a scatter and outer products.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import triton  # noqa: F401  (ImportError here tells the registry that triton is unusable)
from torch import Tensor
from triton.runtime.errors import OutOfResources

from sftkey.kernels.backward import backward_kernel
from sftkey.kernels.configs import INTERPRETED, KernelConfig, default_config, generation
from sftkey.kernels.forward import forward_kernel

from .base import MAX_TOPK, Backend, Head, Needs, RowStats, StatGrads
from .torch import TorchBackend

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK = 8192  # rows per chunk of the host-side vector-matrix products


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(head: Head) -> None:
    x, w = head.x, head.w
    if x.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {x.dtype}; "
                        "use backend='torch' for float64")
    if w.dtype != x.dtype or (head.b is not None and head.b.dtype != x.dtype):
        raise TypeError(f"backend='triton': hidden ({x.dtype}), weight ({w.dtype}) and bias must share a dtype")
    for name, t in (("hidden", x), ("weight", w), ("bias", head.b), ("targets", head.y),
                    ("class_weights", head.c)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"backend='triton': {name} must be contiguous")


def _dot_precision(x: Tensor) -> str:
    """float32 products follow torch's setting: TF32 only where ``torch.backends.cuda.matmul``
    would use it (``torch.set_float32_matmul_precision("high")``), else exact ("ieee")."""
    if x.dtype == torch.float32 and (not x.is_cuda or torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"  # Triton's default; ignored for 16-bit operands


def _launch_args(x: Tensor, cfg: KernelConfig) -> dict:
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, UPCAST=upcast,
                DOT_PREC=_dot_precision(x),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def known_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device of a generation with block shapes (checked by
    ``python -m sftkey.kernels.check``), or the CPU under the interpreter."""
    return generation(device) is not None if device.type == "cuda" else INTERPRETED


def or_torch(method):
    """Run a backend method, or the torch backend's where the kernels cannot run: on a GPU of an
    unknown generation, or after Triton's ``OutOfResources``; warned once per backend."""

    @functools.wraps(method)
    def run(self, head: Head, *args, **kwargs):
        if self.fallback is None and not known_gpu(head.x.device):
            self._fall_back(f"no block shapes for {head.x.device}")
        if self.fallback is None:
            try:
                return method(self, head, *args, **kwargs)
            except OutOfResources as e:
                self._fall_back(str(e))
        return getattr(self.fallback, method.__name__)(head, *args, **kwargs)

    return run


def _vecmat(v: Tensor, m: Tensor) -> Tensor:
    """``v @ m`` in float32 (``v`` [R] float32, ``m`` [R, D]), converting ``_CHUNK`` rows at a time."""
    out = torch.zeros(m.shape[1], dtype=torch.float32, device=m.device)
    for s in range(0, m.shape[0], _CHUNK):
        out += v[s:s + _CHUNK] @ m[s:s + _CHUNK].float()
    return out


class FusedTritonBackend(Backend):
    """Fused Triton kernels, in every pass: the tightest memory (``O(N)`` beyond the
    gradients), ``8NDV`` for a scalar loss (the generic single pass: forward, then the
    recompute backward). ``forward_config``/``backward_config`` override the block shapes
    of :mod:`sftkey.kernels.configs`; ``vocab_splits`` fixes the forward's programs per row block."""

    name = "triton-fused"

    def __init__(self, forward_config: Optional[KernelConfig] = None,
                 backward_config: Optional[KernelConfig] = None, vocab_splits: Optional[int] = None):
        self.forward_config = forward_config
        self.backward_config = backward_config
        self.vocab_splits = vocab_splits
        self.fallback: Optional[Backend] = None

    def _fall_back(self, why: str) -> None:
        warnings.warn(f"backend={self.name!r}: {why}; using backend='torch' instead", RuntimeWarning, stacklevel=4)
        self.fallback = TorchBackend()

    def available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.is_available()
        return device.type == "cpu" and INTERPRETED

    def _splits(self, x: Tensor, cfg: KernelConfig, num_n: int, num_tiles: int) -> int:
        """Vocabulary splits per row block: enough programs for ``cfg.occupancy`` per SM."""
        if self.vocab_splits is not None:
            splits = self.vocab_splits
        elif x.is_cuda and cfg.occupancy:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            splits = _cdiv(sms * cfg.occupancy, num_n)
        else:
            splits = 1
        return max(1, min(splits, num_tiles))

    @or_torch
    def forward(self, head: Head, topk: int = 0) -> RowStats:
        head = head.gathered()
        _check(head)
        x, w, b, y, c = head.x, head.w, head.b, head.y, head.c
        (n, d), v = x.shape, w.shape[0]
        if not 0 <= topk <= min(MAX_TOPK, v):
            raise ValueError(f"backend='triton': topk must be in [0, {min(MAX_TOPK, v)}], got {topk}")
        f32 = dict(dtype=torch.float32, device=x.device)
        if n == 0:
            empty = torch.empty(0, **f32)
            return RowStats(empty, empty, empty, empty, torch.empty(0, dtype=torch.int64, device=x.device),
                            torch.empty(0, topk, **f32) if topk else None)
        cfg = self.forward_config or default_config("forward", x.dtype, x.device)
        num_n, num_tiles = _cdiv(n, cfg.block_n), _cdiv(v, cfg.block_v)
        tiles_per_split = _cdiv(num_tiles, self._splits(x, cfg, num_n, num_tiles))
        splits = _cdiv(num_tiles, tiles_per_split)

        m, sum_exp, t, zy, wsum, amax_v = (torch.empty(splits, n, **f32) for _ in range(6))
        amax_i = torch.empty(splits, n, dtype=torch.int64, device=x.device)
        top = torch.empty(splits, n, topk, **f32) if topk else m
        cvec = c.float() if c is not None else None
        forward_kernel[(num_n * splits,)](
            x, w, b if b is not None else x, y, cvec if cvec is not None else m,
            m, sum_exp, t, zy, wsum, amax_v, amax_i, top,
            n, v, d, tiles_per_split, float(head.softcap or 1.0),
            HAS_BIAS=b is not None, HAS_C=c is not None, SOFTCAP=head.softcap is not None,
            TOPK=topk, K_PAD=triton.next_power_of_2(max(topk, 1)), **_launch_args(x, cfg))

        # Merge the splits: lse = M + log sum_s l_s e^{m_s - M}, S = sum_s t_s e^{m_s - M} / that sum.
        mx = m.max(0).values
        scale = torch.exp(m - mx)
        lsum = (sum_exp * scale).sum(0)
        lse = mx + torch.log(lsum)
        s_exp = (t * scale).sum(0) / lsum
        best = amax_v.argmax(0, keepdim=True)  # first split holding the max: first index overall
        argmax = amax_i.gather(0, best).squeeze(0)
        topk_vals = top.permute(1, 0, 2).reshape(n, -1).topk(topk, dim=1).values if topk else None
        return RowStats(lse, zy.sum(0), s_exp, wsum.sum(0), argmax, topk_vals)

    @or_torch
    def backward(self, head: Head, stats: RowStats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None):
        rows, head = head, head.gathered()
        _check(head)
        x, w, b, y, c, cap = head.x, head.w, head.b, head.y, head.c, head.softcap
        (n, d), v = x.shape, w.shape[0]
        g_lse, g_zy, g_s, g_z = (None if g is None else g.float().contiguous() for g in grads)
        f32 = dict(dtype=torch.float32, device=x.device)
        dx = torch.zeros(n, d, **f32) if needs.dx else None
        dw = torch.zeros(v, d, **f32) if needs.dw else None
        db = torch.zeros(v, **f32) if needs.db and b is not None else None
        cvec = c.float() if c is not None else None

        dense_gzy, dense_gz = cap is not None and g_zy is not None, cap is not None and g_z is not None
        dense = g_lse is not None or g_s is not None or dense_gzy or dense_gz
        if n and (dx is not None or dw is not None or db is not None) and dense:
            cfg = self.backward_config or default_config("backward", x.dtype, x.device)
            grid = (_cdiv(n, cfg.block_n) * _cdiv(v, cfg.block_v),)
            lse = stats.lse.float().contiguous()
            s_exp = stats.expected_logit.float().contiguous() if g_s is not None else lse
            dummy = lse
            backward_kernel[grid](
                x, w, b if b is not None else x, y, cvec if cvec is not None else dummy,
                lse, s_exp,
                *(g if g is not None else dummy for g in (g_lse, g_zy, g_s, g_z)),
                dx if dx is not None else dummy, dw if dw is not None else dummy,
                db if db is not None else dummy,
                n, v, d, float(cap or 1.0), float(filter_eps or 0.0),
                HAS_BIAS=b is not None, HAS_C=c is not None, SOFTCAP=cap is not None,
                HAS_GLSE=g_lse is not None, HAS_GS=g_s is not None,
                DENSE_GZY=dense_gzy, DENSE_GZ=dense_gz,
                NEED_DX=dx is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
                FILTER=filter_eps is not None and not dense_gz, GROUP_N=cfg.group_n,
                **_launch_args(x, cfg))

        if n and g_zy is not None and not dense_gzy:
            # One-hot part: dz_{i, y_i} += g_zy_i (ignored rows, y = -1, contribute nothing).
            valid = y >= 0
            yc = torch.where(valid, y, 0)
            g = torch.where(valid, g_zy, 0.0)
            if dx is not None:
                dx.addcmul_(g[:, None], w[yc])
            if dw is not None:
                dw.index_add_(0, yc, x * g[:, None])
            if db is not None:
                db.index_add_(0, yc, g)
        if n and g_z is not None and not dense_gz:
            # Rank-one part: dz_ij += g_Z_i c_j.
            if dx is not None:
                cw = _vecmat(cvec, w) if cvec is not None else w.sum(0, dtype=torch.float32)
                dx.addr_(g_z, cw)
            if dw is not None:
                u = _vecmat(g_z, x)
                if cvec is None:
                    dw += u
                else:
                    dw.addr_(cvec, u)
            if db is not None:
                db.add_(g_z.sum() if cvec is None else cvec * g_z.sum())

        return (rows.scattered(None if dx is None else dx.to(x.dtype)),
                None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(b.dtype))
