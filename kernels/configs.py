"""Block shapes and launch settings of the kernels, per GPU generation.

The shapes are choices made without a GPU (none on the build machines), not measurements:
the largest tiles that :mod:`.check` (Triton's compiler and bundled ptxas, on the CPU)
compiles without register spills under the heaviest flags (bias, class weights, soft-cap,
top-32, every gradient term dense) and within each generation's shared memory per block.
128 x 128 logits tiles spilled there on sm_90 (forward 700 bytes, backward 3960) and
64 x 128 ones still did in the backward; 64 x 64 tiles do not. The mma.sync generations
(sm_80, sm_86/89) take 32-wide operand slices in the backward (64-wide ones spilled 64 bytes
on sm_86), and so does sm_100 (64-wide float32 slices spilled 8 bytes there under Triton 3.6,
none under 3.9; 32-wide ones leave 37 registers of 255 to spare under both). Re-tune them with ``bench/`` on a GPU and record the measured choice here.

* forward: a ``BLOCK_N x BLOCK_V`` logits tile from ``BLOCK_D``-wide operand slices of X
  and W, ``num_stages`` of them in flight.
* backward: the same tile, then ``dz`` (cast to the input dtype) times slices of W and X.
* float32 inputs halve ``BLOCK_D`` so the pipelined slices take the same shared memory
  (their products are exact fp32 FMAs, no tensor cores, unless torch's float32 matmul
  precision allows TF32).
* row kernels (:mod:`.rows`, the single pass): one program per row, ``block_v`` columns at
  a time; memory-bound, no shared memory beyond the reductions'.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU) every op runs in NumPy, so the
blocks are small (and ``tl.dot`` needs every dimension >= 16).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 3
    #: forward: programs per SM to aim for when splitting the vocabulary across programs
    #: (0: never split); backward: row blocks per group in the L2-friendly launch order.
    occupancy: int = 2
    group_n: int = 8


INTERPRETER = KernelConfig(block_n=16, block_v=32, block_d=32, num_warps=1, num_stages=1,
                           occupancy=0, group_n=2)


@dataclass(frozen=True)
class RowConfig:
    """Launch settings of the row kernels (:mod:`.rows`): one program per row, ``block_v``
    columns per chunk."""

    block_v: int
    num_warps: int = 8


INTERPRETER_ROWS = RowConfig(block_v=64, num_warps=1)


@dataclass(frozen=True)
class Generation:
    """The launch settings of one GPU generation (compute capability ``major * 10 + minor``)
    and its shared memory per block (the opt-in maximum)."""

    capability: int
    shared_bytes: int
    forward: KernelConfig
    backward: KernelConfig
    rows: RowConfig

    def fused(self, kind: str, float32: bool) -> KernelConfig:
        """The fused ``kind`` ("forward"/"backward") kernel's settings; float32 inputs halve
        ``block_d`` so the pipelined slices of X and W take the same shared memory."""
        cfg = self.forward if kind == "forward" else self.backward
        return replace(cfg, block_d=cfg.block_d // 2) if float32 else cfg


_KIB = 1024
_TILE = KernelConfig(block_n=64, block_v=64, block_d=64, num_warps=8, num_stages=3)
_ROWS = RowConfig(block_v=2048, num_warps=8)
_SMALL_SHARED = Generation(86, 99 * _KIB, replace(_TILE, num_stages=2), replace(_TILE, block_d=32, num_stages=2), _ROWS)

#: By compute capability. Shared memory per block: 163 KiB on sm_80 (A100) and 227 KiB on
#: sm_90 (H100/H200), torch's own figures for those parts (166912 and 232448 bytes in
#: ``torch.testing._internal.inductor_utils``); 99 KiB on sm_86/sm_89 and 227 KiB on sm_100,
#: the CUDA programming guide's table.
GENERATIONS = {
    80: Generation(80, 163 * _KIB, _TILE, replace(_TILE, block_d=32), _ROWS),
    86: _SMALL_SHARED,
    89: replace(_SMALL_SHARED, capability=89),
    90: Generation(90, 227 * _KIB, _TILE, _TILE, _ROWS),
    100: Generation(100, 227 * _KIB, _TILE, replace(_TILE, block_d=32), _ROWS),
}


#: The input dtypes the kernels take (no float64).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Whether the kernels run in Triton's interpreter. Read once, at import, as ``triton.jit`` does
#: when it decorates the kernels (so ``TRITON_INTERPRET=1`` must be set before importing).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def generation(device: torch.device):
    """The :class:`Generation` of a CUDA ``device``, or None for one not in :data:`GENERATIONS`."""
    major, minor = torch.cuda.get_device_capability(device)
    return GENERATIONS.get(major * 10 + minor)


#: The most top-k logits a forward tile of the generation's shape keeps; more take half as many rows.
TILE_TOPK = 16


def topk_config(cfg: KernelConfig, topk: int) -> KernelConfig:
    """The forward's settings for ``topk``: ``cfg``, or above :data:`TILE_TOPK` a tile of 32 x 32
    with at most 2 stages (a 64 x 64 tile's running top-32 spilled registers on sm_90 and sm_100
    under Triton 3.6, and so did 32 x 64 and 64 x 32 ones on some generation; 32 x 32 with 3
    stages spilled 12 bytes in fp32 under Triton 3.8; this one spills nowhere under 3.6, 3.8 or
    3.9)."""
    return cfg if topk <= TILE_TOPK else replace(cfg, block_n=min(cfg.block_n, 32), block_v=min(cfg.block_v, 32),
                                                 num_stages=min(cfg.num_stages, 2))


def default_config(kind: str, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The launch settings for ``kind`` ("forward" or "backward") and the inputs' ``dtype`` on
    ``device`` (a CUDA device of a known generation, or the CPU under the interpreter)."""
    if INTERPRETED:
        return INTERPRETER
    return generation(device).fused(kind, dtype == torch.float32)


def row_config(device: torch.device) -> RowConfig:
    """The row kernels' launch settings on ``device`` (as :func:`default_config`)."""
    return INTERPRETER_ROWS if INTERPRETED else generation(device).rows


def known_gpu(device: torch.device) -> bool:
    """Whether the kernels have launch settings on ``device``: a CUDA device of a generation in
    :data:`GENERATIONS` (checked by :mod:`.check`), or the CPU under the interpreter."""
    return generation(device) is not None if device.type == "cuda" else INTERPRETED


def tile_args(x: torch.Tensor, cfg: KernelConfig) -> dict:
    """The tile kernels' block shapes and launch options for inputs like ``x``: ``UPCAST`` bf16
    operand slices to fp32 under the interpreter (its bf16 ``tl.dot`` is wrong); float32
    products in TF32 only where torch's own CUDA matmul would use it
    (``torch.set_float32_matmul_precision("high")``), else exact ("ieee")."""
    exact = x.dtype == torch.float32 and (not x.is_cuda or torch.get_float32_matmul_precision() == "highest")
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                UPCAST=INTERPRETED and x.dtype == torch.bfloat16, DOT_PREC="ieee" if exact else "tf32",
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


#: The Triton paths a GPU run verifies: the single pass's row kernels (``"triton"``), the fused
#: tile kernels (``"triton-fused"``), the two-head KL rows (``"two-head"``).
PATHS = ("triton", "triton-fused", "two-head")
#: The records of passed GPU runs (``scripts/gpu-check.sh`` writes one).
RECORDS = Path(__file__).with_name("verified.json")


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def verified(device: torch.device, path: str) -> bool:
    """Whether a record in :data:`RECORDS` says ``path`` passed ``scripts/gpu-check.sh`` on a
    GPU of ``device``'s compute capability with this Triton and torch (major.minor)."""
    import triton

    major, minor = torch.cuda.get_device_capability(device)
    here = (major * 10 + minor, _minor(triton.__version__), _minor(torch.__version__))
    records = json.loads(RECORDS.read_text())["records"]
    return any((r["capability"], _minor(r["triton"]), _minor(r["torch"])) == here and path in r["paths"]
               for r in records)
