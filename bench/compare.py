"""``python -m bench.compare REV``: the working tree's sftkey against the sftkey of a git
revision, on the same shapes, in one run, as a ratio.

For a change that should not change speed (a refactor): each timed run is a fresh process
started in one of the two trees (``git archive REV`` into a temporary folder, and this
repository), which imports that tree's sftkey, makes its inputs (the same for both), warms up,
and times forward and backward of ``sftkey.linear_cross_entropy`` (``--backend``, default
torch). The two trees' runs alternate, the first one switching every round, so that the
machine's load falls on both alike. The result names the CPU, the load and both commits,
and is written under ``bench/results``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime
from io import BytesIO
from pathlib import Path

from . import ROOT
from .cases import PRESETS, parse_shape
from .report import stamp

#: One timed run: the tree's sftkey, seeded inputs, ``warmup`` calls, then the median of ``calls``.
RUN = """
import json, statistics, sys, time, torch, sftkey
n, d, v, dtype, backend, warmup, calls = sys.argv[1:]
torch.manual_seed(0)
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
x = torch.randn(int(n), int(d)).to(dt).requires_grad_()
w = (torch.randn(int(v), int(d)) * 2 / int(d) ** 0.5).to(dt).requires_grad_()
y = torch.randint(0, int(v), (int(n),))
y[torch.rand(int(n)) < 0.1] = -100
times = []
for i in range(int(warmup) + int(calls)):
    start = time.perf_counter()
    sftkey.linear_cross_entropy(x, w, y, backend=backend).backward()
    if i >= int(warmup):
        times.append(time.perf_counter() - start)
    x.grad = w.grad = None
print(json.dumps({"median_s": statistics.median(times), "file": sftkey.__file__}))
"""


def export(rev: str, into: Path) -> str:
    """The files of ``rev`` under ``into`` (symbolic links kept); its full commit id."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    data = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="tar")
    return commit


def run_in(tree: Path, script: str, *args, env: dict | None = None) -> dict:
    """``script`` (Python source) in a fresh process started in ``tree`` (so that it imports that
    tree's sftkey), with ``args``; the JSON of its last line of output."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (env or {})
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=tree, env=environ,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"run in {tree} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(tree: Path, case, backend: str, warmup: int, calls: int) -> float:
    result = run_in(tree, RUN, case.n, case.d, case.v, case.dtype, backend, warmup, calls)
    if not Path(result["file"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the run in {tree} imported {result['file']}")
    return result["median_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="the git revision to compare the working tree with")
    p.add_argument("--preset", choices=PRESETS, default="cpu-default")
    p.add_argument("--shape", action="append", default=[], metavar="N,D,V", help="also this shape (repeatable)")
    p.add_argument("--dtype", default="bf16", help="dtype of the preset's cases and the shapes (default bf16)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--rounds", type=int, default=5, help="timed runs per tree and case (default 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--calls", type=int, default=3, help="timed calls per run, their median kept (default 3)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    cases = PRESETS[args.preset](args.dtype) + [parse_shape(s, args.dtype) for s in args.shape]
    meta = stamp(__import__("torch").device("cpu"), {"compare": args.rev, "backend": args.backend,
                                                       "rounds": args.rounds, "calls": args.calls})
    rows = []
    with tempfile.TemporaryDirectory(prefix="sftkey-compare-") as tmp:
        before = Path(tmp)
        meta["rev_commit"] = export(args.rev, before)
        trees = {"before": before, "after": ROOT}
        for case in cases:
            times = {name: [] for name in trees}
            for r in range(args.rounds):
                for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    times[name].append(timed(trees[name], case, args.backend, args.warmup, args.calls))
            med = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"case": case.label, **{f"{k}_ms": [round(t * 1e3, 1) for t in v] for k, v in times.items()},
                         "ratio": round(med["after"] / med["before"], 3)})
            print(f"{case.label}: before {med['before'] * 1e3:.1f} ms, after {med['after'] * 1e3:.1f} ms, "
                  f"ratio {rows[-1]['ratio']:.3f}", flush=True)
    meta["load_average_end"] = os.getloadavg()[0]
    name = f"{datetime.fromisoformat(meta['date']):%Y%m%d-%H%M%S}-compare-{meta['device_slug']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# {args.backend} backend: working tree vs {args.rev} ({meta['rev_commit'][:7]})", "",
             f"{meta['device']} | {meta['commit']} | {meta['date']} | load {meta['load_average_start']:.1f} at the "
             f"start, {meta['load_average_end']:.1f} at the end", "", "| case | before ms (runs) | after ms (runs) | after / before |",
             "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['before_ms']} | {r['after_ms']} | {r['ratio']:.3f} |" for r in rows]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / name}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
