"""``python -m bench``: sftkey and its peers on the same inputs (time, memory, accuracy).

Each implementation runs in a fresh process of its own (see measure.py); the parent computes
the float64 reference and verifies every result against it. The command exits with 1 when
a result fails verification or errors. Methodology: NOTES.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from .cases import DTYPES, PRESETS, Case, Options, make_inputs, model_cases, parse_shape
from . import ROOT
from .measure import WARMUP, Worker
from .peers import IMPLS
from .report import print_table, stamp, summarize, write
from .verify import TOLERANCE, errors, passes, reference


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of presets and shapes that do not fix one")
    p.add_argument("--preset", choices=PRESETS, help="default: gpu on CUDA, cpu-default elsewhere")
    p.add_argument("--model", help="a DESIGN.md model (e.g. Llama-3-8B) at the token counts of --n")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384], help="token counts for --model")
    p.add_argument("--shape", action="append", default=[], metavar="N,D,V", help="an explicit shape (repeatable)")
    p.add_argument("--pass", dest="pass_", choices=("fwd", "fwd-bwd"), default="fwd-bwd")
    p.add_argument("--token-weights", action="store_true", help="random per-token weights in [0, 1)")
    p.add_argument("--entropy", type=float, default=0.0, metavar="COEF", help="entropy weight e (scalar)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--softcap", type=float)
    p.add_argument("--z-loss", type=float, default=0.0)
    p.add_argument("--filter-eps", type=float, help="gradient filtering threshold (sftkey, CCE on CUDA)")
    p.add_argument("--ignored", type=float, default=0.1, metavar="SHARE",
                   help="share of targets set to ignore_index (prompt tokens; default 0.1)")
    p.add_argument("--impl", default=",".join(IMPLS), help=f"comma-separated subset of: {', '.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation and case")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    unknown = set(args.impl.split(",")) - set(IMPLS)
    if unknown:
        p.error(f"unknown --impl {', '.join(sorted(unknown))}; choose from {', '.join(IMPLS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not 0 <= args.ignored < 1:
        p.error(f"--ignored must be in [0, 1), got {args.ignored}")
    try:
        args.cases, args.name = select_cases(args)
    except ValueError as e:
        p.error(str(e))
    return args


def select_cases(args: argparse.Namespace) -> tuple:
    """The cases to run and a name for the output files."""
    cases = [parse_shape(s, args.dtype) for s in args.shape]
    if args.model:
        cases += model_cases(args.model, args.n, args.dtype)
    if cases:
        return cases, "custom"
    preset = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu-default")
    return PRESETS[preset](args.dtype), preset


def run_case(case: Case, workers: dict, opts: Options, args, workdir: Path, progress, task) -> list:
    """Every implementation on ``case``, verified; one summary row each."""
    device = torch.device(args.device)
    ref, rows = None, []
    for name, worker in workers.items():
        progress.update(task, description=f"{case.label} · {name}")
        reason = IMPLS[name].skip_reason(device, opts)
        result = {"skipped": reason} if reason else worker.run(case, opts, args.pass_, args.device, args.repeats,
                                                               workdir / f"{name}.pt")
        errs, ok = {}, False
        if "outputs" in result:
            if ref is None:
                progress.update(task, description=f"{case.label} · float64 reference")
                ref = reference(case, opts, make_inputs(case, opts, device, seed=0), args.pass_)
                if device.type == "cuda":  # leave the workers the whole device
                    torch.cuda.empty_cache()
            errs = errors(torch.load(result["outputs"], mmap=True), ref)
            ok = passes(errs, case.dtype)
            Path(result["outputs"]).unlink()
        rows.append(summarize(case, name, result, args.pass_, errs, ok))
        progress.print(f"{case.label} · {name}: {rows[-1]['status']}"
                       + (f", median {rows[-1]['median_s'] * 1e3:.1f} ms" if "median_s" in rows[-1] else ""),
                       highlight=False)
        progress.advance(task)
    return rows


def main(argv=None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    args = parse_args(argv)
    cases, name = args.cases, args.name
    opts = Options(token_weights=args.token_weights, entropy=args.entropy, label_smoothing=args.label_smoothing,
                   softcap=args.softcap, z_loss=args.z_loss, filter_eps=args.filter_eps, ignored=args.ignored)
    workers = {impl: Worker(impl) for impl in args.impl.split(",")}
    device = torch.device(args.device)
    console = Console(width=None if sys.stdout.isatty() else 160)
    meta = stamp(device, {"preset": name, "pass": args.pass_, "repeats": args.repeats, "warmup": WARMUP,
                          "options": vars(opts), "cases": [c.label for c in cases], "impls": list(workers)})
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sftkey-bench-") as tmp, Progress(console=console) as progress:
        task = progress.add_task("bench", total=len(cases) * len(workers))
        try:
            for case in cases:
                rows += run_case(case, workers, opts, args, Path(tmp), progress, task)
        finally:
            for worker in workers.values():
                worker.close()
    meta.update(load_average_end=os.getloadavg()[0], wall_s=round(time.perf_counter() - started, 1))
    print_table(rows, meta, console)
    paths = write(rows, meta, args.out, f"{datetime.fromisoformat(meta['date']):%Y%m%d-%H%M%S}-{name}-{device.type}")
    console.print("wrote " + ", ".join(str(p) for p in paths))
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    if bad:
        console.rule("[bold red]FAILED", style="red")
    for r in bad:
        detail = r.get("reason") or ", ".join(f"{k} {v:.1e}" for k, v in r["rel_err"].items())
        limit = "" if r["status"] == "error" else f" (tolerance {TOLERANCE[r['dtype']]:g})"
        console.print(f"[bold red]{r['status']}: {r['impl']} on {r['case']}: {detail}{limit}", highlight=False)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
