"""``python -m bench.first_call``: what a call costs the first time, when shapes change, and
on peaked logits (issue "no stall when shapes change"), each in fresh processes.

* **first**: a fresh process's first ``linear_cross_entropy`` forward and backward against
  its steady calls (the median of calls 3 to 7; each the median over 3 fresh processes), at
  the README quickstart's shape and the ``cpu-default`` preset's, in the CPU's native dtype;
  target: first <= 1.5x steady.
* **variable-N**: 8 training steps (forward, backward, AdamW) of a Llama of 18M parameters
  (V=32000) whose token count changes every step: unpatched, patched by ``use_fused_loss``
  with product tuning on, and with it off (``SFTKEY_TUNE_PRODUCTS=0``); target: patched with
  tuning <= 0.9x unpatched, and no slower than with tuning off.
* **peaked**: N=1024, D=256, V=32000 with unit-variance inputs (a very peaked softmax, whose
  exponentials underflow), one thread: the first and second call, and ``F.cross_entropy``
  on the materialized logits for scale.

``--rev REV`` also runs every case in the sftkey of a git revision (``git archive``), for a
before/after in the same run. Results go to ``bench/results`` (JSON, Markdown), named by CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

from . import ROOT
from .compare import export, run_in
from .report import stamp

FIRST = """
import json, statistics, sys, time, torch, sftkey
b, t, d, v, dtype = sys.argv[1:]
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
torch.manual_seed(0)
x = torch.randn(int(b), int(t), int(d)).to(dt).requires_grad_()
w = (torch.randn(int(v), int(d)) * 2 / int(d) ** 0.5).to(dt).requires_grad_()
y = torch.randint(0, int(v), (int(b), int(t)))
times = []
for i in range(7):
    start = time.perf_counter()
    sftkey.linear_cross_entropy(x, w, y, shift=True).backward()
    times.append(time.perf_counter() - start)
    x.grad = w.grad = None
print(json.dumps({"first_s": times[0], "steady_s": statistics.median(times[2:])}))
"""

PEAKED = """
import json, time, torch, torch.nn.functional as F, sftkey
torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(1024, 256, requires_grad=True)
w = torch.randn(32000, 256, requires_grad=True)
y = torch.randint(0, 32000, (1024,))
out = {}
for name in ("first_s", "second_s"):
    start = time.perf_counter()
    sftkey.linear_cross_entropy(x, w, y, backend="torch").backward()
    out[name] = time.perf_counter() - start
start = time.perf_counter()
F.cross_entropy(x @ w.T, y).backward()
out["f_cross_entropy_s"] = time.perf_counter() - start
print(json.dumps(out))
"""

STEPS = """
import json, sys, time, torch, transformers
arm = sys.argv[1]
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                               tie_word_embeddings=False)
model = transformers.LlamaForCausalLM(cfg)
if arm != "unpatched":
    from sftkey.integrations.transformers import use_fused_loss
    use_fused_loss(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
lengths = [96, 160, 128, 200, 112, 176, 144, 192]  # tokens per sequence, step by step
g = torch.Generator().manual_seed(1)
times = []
for length in lengths:
    ids = torch.randint(0, 32000, (8, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 4] = -100  # a prompt without labels: the labelled count changes too
    start = time.perf_counter()
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(json.dumps({"steps_s": times, "total_s": sum(times),
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def _first(tree: Path, shape, dtype: str, processes: int) -> dict:
    """The median first and steady call over ``processes`` fresh processes."""
    runs = [run_in(tree, FIRST, *shape, dtype) for _ in range(processes)]
    return {key: statistics.median(r[key] for r in runs) for key in ("first_s", "steady_s")} | {"processes": processes}


def measure(tree: Path, dtype: str, processes: int) -> dict:
    first = {label: _first(tree, shape, dtype, processes)
             for label, shape in (("quickstart 4x128, D=1024, V=32768", (4, 128, 1024, 32768)),
                                  ("cpu-default N=512, D=512, V=16384", (1, 513, 512, 16384)),
                                  ("cpu-default N=1024, D=512, V=16384", (1, 1025, 512, 16384)))}
    steps = {arm: run_in(tree, STEPS, arm, env={"SFTKEY_TUNE_PRODUCTS": "0"} if arm == "patched, tuning off" else None)
             for arm in ("unpatched", "patched, tuning on", "patched, tuning off")}
    return {"first": first, "variable_n": steps, "peaked": run_in(tree, PEAKED)}


def _markdown(results: dict, meta: dict) -> str:
    lines = [f"# First calls, changing shapes, peaked logits ({meta['device']})", "",
             f"{meta['commit']} | {meta['date']} | {meta['cpu']} | load {meta['load_average_start']:.1f} at the start, "
             f"{meta['load_average_end']:.1f} at the end | dtype {meta['dtype']}", ""]
    for tree, r in results.items():
        lines += [f"## {tree}", "", "| first call | first ms | steady ms | first / steady |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['first_s'] * 1e3:.1f} | {v['steady_s'] * 1e3:.1f} | {v['first_s'] / v['steady_s']:.2f} |"
                  for k, v in r["first"].items()]
        base = r["variable_n"]["unpatched"]["total_s"]
        lines += ["", "| 8 training steps, N changing | total s | / unpatched | steps s |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['total_s']:.2f} | {v['total_s'] / base:.2f} | {', '.join(f'{t:.2f}' for t in v['steps_s'])} |"
                  for k, v in r["variable_n"].items()]
        p = r["peaked"]
        lines += ["", f"Peaked logits (N=1024, D=256, V=32000, one thread): first {p['first_s']:.2f} s, second "
                      f"{p['second_s']:.2f} s; F.cross_entropy on materialized logits {p['f_cross_entropy_s']:.2f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.first_call", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", help="also measure the sftkey of this git revision")
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes per first-call shape; their median counts (default 3)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    from .__main__ import native_dtype

    dtype = native_dtype(torch.device("cpu"))
    meta = stamp(torch.device("cpu"), {"dtype": dtype, "rev": args.rev})
    results = {"working tree": measure(ROOT, dtype, args.processes)}
    if args.rev:
        with tempfile.TemporaryDirectory(prefix="sftkey-rev-") as tmp:
            meta["rev_commit"] = export(args.rev, Path(tmp))
            results[f"{args.rev} ({meta['rev_commit'][:7]})"] = measure(Path(tmp), dtype, args.processes)
    meta["load_average_end"] = os.getloadavg()[0]
    name = f"{datetime.fromisoformat(meta['date']):%Y%m%d-%H%M%S}-first-call-{meta['device_slug']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = _markdown(results, meta)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
