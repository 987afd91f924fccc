"""``python -m bench``: sftkey and its peers on the same inputs (time, memory, accuracy).

Each implementation runs in a fresh process of its own (see measure.py); the parent computes
the float64 reference and verifies every result against it. The command exits with 1 when
one of sftkey's results fails verification or errors (a peer's failures are reported, and
do not). Methodology: NOTES.md.
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
    p.add_argument("--dtype", choices=DTYPES, help="dtype of presets and shapes that do not fix one (default: bf16 "
                   "where the device runs bf16 matrix products natively, else fp32)")
    p.add_argument("--preset", choices=PRESETS, help="default: gpu on CUDA, cpu-default elsewhere")
    p.add_argument("--model", help="a benchmark model of docs/benchmarks.md (e.g. Llama-3-8B) at the token counts of --n")
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
    p.add_argument("--time-budget", type=float, default=60.0, metavar="S",
                   help="seconds per implementation and case (warm-up, timed and memory runs); an implementation "
                        "whose warm-up shows it would take longer is reported as too slow (default 60)")
    p.add_argument("--order", choices=("interleaved", "sequential"),
                   help="interleave the implementations' timed runs (default on the CPU, where other jobs on a shared "
                        "machine come and go) or run each implementation's in one stretch (default on CUDA)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    unknown = set(args.impl.split(",")) - set(IMPLS)
    if unknown:
        p.error(f"unknown --impl {', '.join(sorted(unknown))}; choose from {', '.join(IMPLS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not args.time_budget > 0:
        p.error("--time-budget must be > 0")
    if args.dtype is None:
        args.dtype = native_dtype(torch.device(args.device))
    if args.order is None:
        args.order = "sequential" if args.device.startswith("cuda") else "interleaved"
    if not 0 <= args.ignored < 1:
        p.error(f"--ignored must be in [0, 1), got {args.ignored}")
    try:
        args.cases, args.name = select_cases(args)
    except ValueError as e:
        p.error(str(e))
    return args


def native_dtype(device: torch.device) -> str:
    """bf16 where ``device`` runs bf16 matrix products natively, else fp32."""
    from sftkey.backends.products import lowp_native_on_cpu

    return "bf16" if device.type != "cpu" or lowp_native_on_cpu(torch.bfloat16) else "fp32"


def select_cases(args: argparse.Namespace) -> tuple:
    """The cases to run and a name for the output files."""
    cases = [parse_shape(s, args.dtype) for s in args.shape]
    if args.model:
        cases += model_cases(args.model, args.n, args.dtype)
    if cases:
        return cases, "custom"
    preset = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu-default")
    return PRESETS[preset](args.dtype), preset


#: Pause before a timed run that follows another process's: its OpenMP threads spin for a while
#: after its run, and an implementation timed meanwhile on the same cores ran 3-5x slower.
SETTLE_S = 0.3


def measure_case(case: Case, workers: dict, opts: Options, args, workdir: Path) -> dict:
    """Every implementation's results on ``case``. Interleaved: all are prepared, then each
    makes one timed run in turn, round after round (starting one further each round), so that
    a change in the machine's load falls on all alike; sequential: one after the other, so that
    only one holds the case's memory (the default on CUDA)."""
    device = torch.device(args.device)
    results = {}

    def prepare(name):
        reason = IMPLS[name].skip_reason(device, opts)
        results[name] = {"skipped": reason} if reason else workers[name].prepare(
            case, opts, args.pass_, args.device, args.repeats, workdir / f"{name}.pt", args.time_budget)
        return "ready" in results[name]

    def rounds(names):
        for i in range(args.repeats):
            for name in names[i % len(names):] + names[: i % len(names)]:
                if "ready" in results[name]:
                    time.sleep(SETTLE_S if len(names) > 1 else 0)
                    result = workers[name].run()
                    if "time_s" not in result:
                        results[name] = result

    def finish(name):
        if "ready" in results[name]:
            results[name] = workers[name].finish()

    if args.order == "interleaved":
        ready = [name for name in workers if prepare(name)]
        if ready:
            rounds(ready)
        for name in ready:
            finish(name)
    else:
        for name in workers:
            if prepare(name):
                rounds([name])
                finish(name)
    return results


def verify_case(case: Case, results: dict, opts: Options, args) -> list:
    """One summary row per implementation, its outputs verified against the float64 reference."""
    device = torch.device(args.device)
    ref, rows = None, []
    for name, result in results.items():
        errs, ok = {}, False
        if "outputs" in result:
            if ref is None:
                ref = reference(case, opts, make_inputs(case, opts, device, seed=0), args.pass_)
                if device.type == "cuda":  # leave the next case's workers the whole device
                    torch.cuda.empty_cache()
            errs = errors(torch.load(result["outputs"], mmap=True), ref)
            ok = passes(errs, case.dtype)
            Path(result["outputs"]).unlink()
        rows.append(summarize(case, name, result, args.pass_, errs, ok))
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
                          "time_budget_s": args.time_budget, "order": args.order,
                          "options": vars(opts), "cases": [c.label for c in cases], "impls": list(workers)})
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sftkey-bench-") as tmp, Progress(console=console) as progress:
        task = progress.add_task("bench", total=len(cases))
        try:
            for case in cases:
                progress.update(task, description=case.label)
                case_rows = verify_case(case, measure_case(case, workers, opts, args, Path(tmp)), opts, args)
                for row in case_rows:
                    progress.print(f"{case.label} · {row['impl']}: {row['status']}"
                                   + (f", median {row['median_s'] * 1e3:.1f} ms" if "median_s" in row else ""),
                                   highlight=False)
                rows += case_rows
                progress.advance(task)
        finally:
            for worker in workers.values():
                worker.close()
    meta.update(load_average_end=os.getloadavg()[0], wall_s=round(time.perf_counter() - started, 1))
    print_table(rows, meta, console)
    paths = write(rows, meta, args.out, f"{datetime.fromisoformat(meta['date']):%Y%m%d-%H%M%S}-{name}-{meta['device_slug']}")
    console.print("wrote " + ", ".join(str(p) for p in paths))
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    if bad:
        console.rule("[bold red]FAILED", style="red")
    for r in bad:
        detail = r.get("reason") or ", ".join(f"{k} {v:.1e}" for k, v in r["rel_err"].items())
        limit = "" if r["status"] == "error" else f" (tolerance {TOLERANCE[r['dtype']]:g})"
        console.print(f"[bold red]{r['status']}: {r['impl']} on {r['case']}: {detail}{limit}", highlight=False)
    # a peer's inaccuracy is a finding, reported above; sftkey's own failures fail the run
    return 1 if any(r["impl"].startswith("sftkey") for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
