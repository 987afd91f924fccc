"""Compile-only check of every kernel for every GPU generation of :mod:`.configs`, on any machine.

``python -m sftkey.kernels.check [--json PATH] [capability ...]`` compiles each kernel with the
generation's launch settings through Triton's own compiler for a ``GPUTarget`` (no GPU
needed), runs Triton's bundled ``ptxas -v`` on the PTX, and prints per kernel the shared
memory (``metadata.shared``), registers and spill bytes. It exits 1 where a kernel spills,
exceeds the generation's shared-memory budget per block, or fails to compile. The flags are
the heaviest: bias, class weights, soft-cap, every gradient; the forward at 16 top-k logits and
at 32 (the API's most, with :func:`.configs.topk_config`'s tile).

It must run with ``TRITON_INTERPRET`` unset (interpreted kernels do not compile).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward import backward_kernel
from .configs import GENERATIONS, TILE_TOPK, Generation, topk_config
from .forward import forward_kernel
from .pair_rows import pair_grads_kernel, pair_stats_kernel
from .rows import row_grads_kernel, row_stats_kernel

_INDEX = {"y", "amax_i_out", "argmax_out"}
_SCALARS = {"N": "i32", "V": "i32", "gap": "i32", "D": "i32", "tiles_per_split": "i32", "stride_o": "i64", "stride_dz": "i64",
            "stride_a": "i64",
            "softcap": "fp32", "filter_eps": "fp32"}
_FLAGS = dict(HAS_BIAS=True, HAS_C=True, SOFTCAP=True, HAS_GLSE=True, HAS_GS=True,
              DENSE_GZY=True, DENSE_GZ=True, NEED_DX=True, NEED_DW=True, NEED_DB=True, FILTER=False,
              HAS_S=True, HAS_Z=True, ARGMAX=True, HAS_GZY=True, HAS_GZ=True, UPCAST=False, DOT_PREC="tf32",
              WANT_A=True, WANT_O=True)


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    """Triton's signature of ``fn``: ``pointers`` gives the element type of some pointer
    arguments; the others point to float32 (int64 for indices)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _SCALARS:
            sig[name] = _SCALARS[name]
        else:
            sig[name] = "*i64" if name in _INDEX else f"*{pointers.get(name, 'fp32')}"
    return sig


def _ptxas(capability: int) -> str:
    """Triton's bundled ptxas for ``capability`` (3.9 keeps a newer one for sm_90 and up)."""
    nvidia = triton.knobs.nvidia
    tool = getattr(nvidia, "ptxas_blackwell", None) if capability >= 90 else None
    return (tool or nvidia.ptxas).path


def _usage(ptx: str, capability: int) -> dict:
    """Registers and spill bytes of ``ptx`` from ``ptxas -v``."""
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(capability), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    regs = max((int(n) for n in re.findall(r"Used (\d+) registers", log)), default=0)
    return {"registers": regs, "spill_bytes": spills}


def kernel_cases(gen: Generation):
    """``(name, kernel, pointer types, constexprs, options)`` for every kernel at ``gen``'s
    settings: the fused kernels on bf16 and on float32 inputs, the row kernels on float32
    logits of bf16 inputs (``dz`` written in bf16), the single pass's path on CUDA, and the
    two-head row kernels on float32 blocks."""
    for dtype in ("bf16", "fp32"):
        for name, fn, topk in (("forward", forward_kernel, TILE_TOPK), ("forward-top32", forward_kernel, 2 * TILE_TOPK),
                               ("backward", backward_kernel, 0)):
            cfg = topk_config(gen.fused(name.split("-")[0], dtype == "fp32"), topk)
            consts = {k: v for k, v in _FLAGS.items() if k in fn.arg_names}
            consts.update(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)
            if topk:
                consts.update(TOPK=topk, K_PAD=topk)
            if "GROUP_N" in fn.arg_names:
                consts["GROUP_N"] = cfg.group_n
            yield (f"{name}/{dtype}", fn, dict.fromkeys(("x", "w", "b"), dtype), consts,
                   dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    bf16_dz = dict(o="fp32", b="bf16", dz="bf16")
    for name, fn, pointers in (("row_stats/bf16", row_stats_kernel, bf16_dz),
                               ("row_grads/bf16", row_grads_kernel, bf16_dz),
                               ("pair_stats/fp32", pair_stats_kernel, {}), ("pair_grads/fp32", pair_grads_kernel, {})):
        consts = {k: v for k, v in _FLAGS.items() if k in fn.arg_names}
        consts["BLOCK_V"] = gen.rows.block_v
        yield name, fn, pointers, consts, dict(num_warps=gen.rows.num_warps)


def check(gen: Generation) -> list:
    """One row per kernel of ``gen``: shared memory, registers, spills, and whether it is within budget."""
    rows = []
    for name, fn, pointers, consts, options in kernel_cases(gen):
        row = {"capability": gen.capability, "kernel": name}
        try:
            compiled = triton.compile(ASTSource(fn, _signature(fn, pointers, consts), constexprs=consts),
                                      target=GPUTarget("cuda", gen.capability, 32), options=options)
            row.update(shared=compiled.metadata.shared, **_usage(compiled.asm["ptx"], gen.capability))
            row["ok"] = row["spill_bytes"] == 0 and row["shared"] <= gen.shared_bytes
        except Exception as e:  # noqa: BLE001  (the compiler's errors have no common base class)
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels do not compile", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capabilities", nargs="*", type=int, help="e.g. 80 86 89 90 100 (default: all)")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    gens = [GENERATIONS[c] for c in args.capabilities] if args.capabilities else list(GENERATIONS.values())
    rows = [row for gen in dict.fromkeys(gens) for row in check(gen)]
    for r in rows:
        budget = GENERATIONS[r["capability"]].shared_bytes // 1024
        detail = r.get("error") or (f"shared {r['shared'] // 1024} KiB of {budget}, {r['registers']} registers, "
                                    f"{r['spill_bytes']} spill bytes")
        print(f"sm_{r['capability']:<4} {r['kernel']:<14} {'ok ' if r['ok'] else 'BAD'} {detail}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
