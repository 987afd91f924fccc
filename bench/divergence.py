"""``python -m bench.divergence``: the two-head divergence (docs/design.md, "Two heads") against
the materializing computation, and against ``linear_cross_entropy`` alone on the same shape.

Per case (``N`` tokens, ``D = D_ref``, ``V``; the reference's head another random matrix) and
implementation, a fresh process builds the inputs, warms up, makes ``--repeats`` timed
fwd+bwd runs (gradients to the policy's ``x`` and ``W``; the reference frozen) and one run
that measures the peak memory above what was allocated before it (:mod:`bench.measure`);
the parent verifies each loss and gradient against the float64 oracle
(:func:`sftkey.reference.linear_divergence`) with :mod:`sftkey.testing`'s tolerances.

Implementations: ``sftkey-kl`` (``linear_divergence``, forward KL, mean), ``sftkey-asft``
(``linear_cross_entropy(dft=True, anchor=...)``: DFT plus the KL in one pass; verified
against the oracle's anchored loss), ``sftkey-ce`` (``linear_cross_entropy`` alone: the time
the targets are stated against), ``torch-eager`` and ``torch-compile`` (both heads' float32
logits, ``log_softmax``, the KL) and ``liger-jsd`` (Liger-Kernel's ``LigerFusedLinearJSD``,
CUDA only).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from . import ROOT
from .cases import DTYPES, IGNORE_INDEX, Case
from .measure import WARMUP, elapsed, peak_memory
from .peers import package_version
from .report import stamp

MIB = 1 << 20
IMPLS = ("sftkey-kl", "sftkey-asft", "sftkey-ce", "torch-eager", "torch-compile", "liger-jsd")
#: The divergence's cases: the CPU default shapes (D=512, V=16384, N = 512 and 1024), to
#: show the extra memory flat in N.
CPU_CASES = tuple(Case(n, 512, 16384, "fp32") for n in (512, 1024))
GPU_CASES = tuple(Case(n, 4096, 128256, "bf16", "Llama-3-8B") for n in (4096, 8192))
KL_WEIGHT = 0.1


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Policy ``x [N, D]``, ``w [V, D]``, reference ``xr``, ``wr`` and targets (10% ignored)."""
    g = torch.Generator(device).manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, w = randn(case.n, case.d), randn(case.v, case.d, scale=2 / case.d ** 0.5)
    xr, wr = randn(case.n, case.d), randn(case.v, case.d, scale=2 / case.d ** 0.5)
    y = torch.randint(0, case.v, (case.n,), generator=g, device=device)
    y[torch.rand(case.n, generator=g, device=device) < 0.1] = IGNORE_INDEX
    return dict(x=x, w=w, xr=xr, wr=wr, y=y)


def materialized_kl(x, w, xr, wr, y):
    """What one writes in PyTorch: both heads' float32 logits, the forward KL's mean."""
    logp = torch.log_softmax((x @ w.T).float(), -1)
    with torch.no_grad():
        logq = torch.log_softmax((xr @ wr.T).float(), -1)
    valid = y != IGNORE_INDEX
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return torch.where(valid, kl, 0).sum() / valid.sum()


def build(impl: str, device: torch.device):
    """The loss ``fn(x, w, xr, wr, y)`` of ``impl``; a string (the reason) where it cannot run."""
    import sftkey

    if impl == "sftkey-kl":
        return lambda x, w, xr, wr, y: sftkey.linear_divergence(x, w, xr, wr, y, backend="torch")
    if impl == "sftkey-asft":
        return lambda x, w, xr, wr, y: sftkey.linear_cross_entropy(x, w, y, dft=True, anchor=(xr, wr),
                                                                   anchor_weight=KL_WEIGHT, backend="torch")
    if impl == "sftkey-ce":
        return lambda x, w, xr, wr, y: sftkey.linear_cross_entropy(x, w, y, backend="torch")
    if impl == "torch-eager":
        return materialized_kl
    if impl == "torch-compile":
        return torch.compile(materialized_kl, dynamic=False)
    if device.type != "cuda":
        return "needs CUDA (Liger's fused linear JSD is Triton-only)"
    if package_version("liger-kernel") is None:
        return "not installed (pip install liger-kernel)"
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=0.5, ignore_index=IGNORE_INDEX, temperature=1.0)
    return lambda x, w, xr, wr, y: jsd(x, w, xr, wr, y)


def run_one(spec: dict, conn) -> None:
    """In a fresh process: warm-up, timed runs, the memory run; the outputs saved for verification."""
    try:
        device = torch.device(spec["device"])
        fn = build(spec["impl"], device)
        if isinstance(fn, str):
            conn.send({"skipped": fn})
            return
        inputs = make_inputs(Case(**spec["case"]), device)
        inputs["x"].requires_grad_()
        inputs["w"].requires_grad_()

        def step():
            loss = fn(**inputs)
            return loss, torch.autograd.grad(loss, (inputs["x"], inputs["w"]))

        for _ in range(WARMUP):
            step()
        times, cpu_times = [], []
        for _ in range(spec["repeats"]):
            cpu = time.process_time()
            times.append(elapsed(device, step))
            cpu_times.append(time.process_time() - cpu)
        (loss, grads), peak = peak_memory(device, step)
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        torch.save({"loss": loss.detach().cpu(), "grads": [g.cpu() for g in grads]}, spec["outputs"])
        conn.send({"times": times, "cpu_times": cpu_times, "extra_bytes": peak - grad_bytes})
    except Exception as e:  # reported in the table
        conn.send({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})


def measure(case: Case, impl: str, args, workdir: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    spec = {"impl": impl, "case": vars(case), "device": args.device, "repeats": args.repeats,
            "outputs": str(workdir / f"{impl}.pt")}
    proc = ctx.Process(target=run_one, args=(spec, child))
    proc.start()
    result = parent.recv() if parent.poll(args.time_budget) else {"too slow": f"over {args.time_budget:g} s"}
    proc.kill() if proc.is_alive() and "too slow" in result else None
    proc.join()
    return {**result, "outputs": spec["outputs"]} if "times" in result else result


def oracle(case: Case, device: torch.device, impl: str) -> tuple:
    """The float64 loss and gradients ``(dX, dW)`` that ``impl`` computes."""
    import sftkey

    t = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs(case, device).items()}
    t["x"].requires_grad_()
    t["w"].requires_grad_()
    if impl == "sftkey-asft":
        loss = sftkey.reference.linear_cross_entropy(t["x"], t["w"], t["y"], dft=True, anchor=(t["xr"], t["wr"]),
                                                     anchor_weight=KL_WEIGHT)
    elif impl == "sftkey-ce":
        loss = sftkey.reference.linear_cross_entropy(t["x"], t["w"], t["y"])
    elif impl == "liger-jsd":
        loss = sftkey.reference.linear_divergence(t["x"], t["w"], t["xr"], t["wr"], t["y"], kind="jsd")
    else:
        loss = sftkey.reference.linear_divergence(t["x"], t["w"], t["xr"], t["wr"], t["y"])
    return loss.detach(), torch.autograd.grad(loss, (t["x"], t["w"]))


def verify(case: Case, impl: str, outputs: str, device: torch.device) -> tuple:
    from sftkey.testing import TOLERANCE, rel_err

    got = torch.load(outputs)
    loss, grads = oracle(case, device, impl)
    errs = {"loss": rel_err(got["loss"], loss.cpu()),
            **{name: rel_err(g, want.cpu()) for name, g, want in zip(("dX", "dW"), got["grads"], grads)}}
    return errs, all(e <= TOLERANCE[DTYPES[case.dtype]] for e in errs.values())


def table(rows: list, meta: dict) -> str:
    """The results as a Markdown table: wall-clock times in ms, the process's CPU time per run
    (less sensitive to other work on a shared machine), both relative to ``sftkey-ce`` on the
    same case, extra memory in MiB."""
    lines = [f"# Divergence benchmark: {meta['device']}", "",
             f"commit {meta['commit']}, {meta['date']}, fwd+bwd, {meta['repeats']} timed runs after {WARMUP} warm-up, "
             f"load average {meta['load_average_start']:.2f} at the start, {meta['load_average_end']:.2f} at the end.",
             "", "| case | impl | status | median ms | min–max ms | x sftkey-ce | CPU ms | x sftkey-ce (CPU) | extra MiB "
             "| err loss | err dX | err dW |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["case"]: r for r in rows if r["impl"] == "sftkey-ce" and "median_s" in r}
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r['status']}: {r['reason']} | | | | | | | | | |")
            continue
        b = base.get(r["case"])
        ratio, cpu_ratio = ("", "") if b is None else (f"{r['median_s'] / b['median_s']:.2f}", f"{r['cpu_s'] / b['cpu_s']:.2f}")
        e = r["rel_err"]
        lines.append(f"| {r['case']} | {r['impl']} | {r['status']} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['min_s'] * 1e3:.1f}–{r['max_s'] * 1e3:.1f} | {ratio} | {r['cpu_s'] * 1e3:.1f} | {cpu_ratio} | "
                     f"{r['extra_mib']:.1f} | {e['loss']:.1e} | {e['dX']:.1e} | {e['dW']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import os

    p = argparse.ArgumentParser(prog="python -m bench.divergence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impl", default=",".join(IMPLS), help=f"comma-separated subset of: {', '.join(IMPLS)}")
    p.add_argument("--time-budget", type=float, default=300.0, metavar="S", help="seconds per implementation and case")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    meta = stamp(device, {"benchmark": "divergence", "repeats": args.repeats, "cases": [c.label for c in cases],
                          "impls": args.impl.split(",")})
    rows = []
    with tempfile.TemporaryDirectory(prefix="sftkey-bench-") as tmp:
        for case in cases:
            for impl in args.impl.split(","):
                result = measure(case, impl, args, Path(tmp))
                row = {"case": case.label, "impl": impl}
                if "times" in result:
                    errs, ok = verify(case, impl, result["outputs"], device)
                    t = sorted(result["times"])
                    row.update(status="ok" if ok else "FAIL", times_s=result["times"], median_s=statistics.median(t),
                               min_s=t[0], max_s=t[-1], cpu_s=statistics.median(result["cpu_times"]),
                               extra_mib=result["extra_bytes"] / MIB, rel_err=errs)
                else:
                    status = next(iter(result))
                    row.update(status=status, reason=result[status])
                rows.append(row)
                print(f"{case.label} · {impl}: {row['status']}"
                      + (f", median {row['median_s'] * 1e3:.1f} ms, extra {row['extra_mib']:.1f} MiB"
                         if "median_s" in row else f" ({row.get('reason')})"), flush=True)
    meta["load_average_end"] = os.getloadavg()[0]
    name = f"{datetime.fromisoformat(meta['date']):%Y%m%d-%H%M%S}-divergence-{meta['device_slug']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (args.out / f"{name}.md").write_text(table(rows, meta))
    print(table(rows, meta))
    return 1 if any(r["status"] in ("FAIL", "error") for r in rows if r["impl"].startswith("sftkey")) else 0


if __name__ == "__main__":
    sys.exit(main())
