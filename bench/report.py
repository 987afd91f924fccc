"""Results as a terminal table, JSON, Markdown and a PNG plot, each stamped with where and
what was measured (device, commit, versions, date, shapes, options)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import textwrap
from datetime import datetime
from pathlib import Path

import torch

from . import ROOT
from .peers import IMPLS, package_version

MIB = 1 << 20


#: (vendor, family, model) -> generation, for the CPUs seen on the build machines and their
#: neighbours (a family alone where every model of it is one generation).
CPU_GENERATIONS = {
    ("AuthenticAMD", 23, 49): "Zen 2", ("AuthenticAMD", 25, 1): "Zen 3", ("AuthenticAMD", 25, 17): "Zen 4",
    ("AuthenticAMD", 26, None): "Zen 5", ("GenuineIntel", 6, 106): "Ice Lake",
    ("GenuineIntel", 6, 143): "Sapphire Rapids", ("GenuineIntel", 6, 207): "Emerald Rapids",
    ("GenuineIntel", 6, 173): "Granite Rapids",
}
#: The CPU flags that decide the speed of matrix products here.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
#: Environment variables that change what the products run on (ISA caps, threads, sftkey's settings).
ENV_VARS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS",
            "SFTKEY_CHUNK_MIB", "SFTKEY_LOWP_PRODUCTS")


def cpu_info() -> dict:
    """Model name, vendor, family, model, generation and product-relevant flags of this CPU (Linux)."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    vendor, family, model = fields.get("vendor_id", ""), int(fields.get("cpu family", -1)), int(fields.get("model", -1))
    generation = CPU_GENERATIONS.get((vendor, family, model)) or CPU_GENERATIONS.get((vendor, family, None))
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name", platform.processor()), "vendor": vendor, "family": family,
            "model": model, "generation": generation, "flags": [f for f in CPU_FLAGS if f in flags],
            "capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = cpu_info()
    generation = f" ({cpu['generation']})" if cpu["generation"] else ""
    return (f"{cpu['model_name']}{generation}, family {cpu['family']} model {cpu['model']}, torch capability "
            f"{cpu['capability']}, {cpu['cores']} cores, {cpu['torch_threads']} torch threads")


def device_slug(device: torch.device) -> str:
    """A file-name part naming the device: the GPU, or the CPU's generation (else vendor, family
    and model) and the instruction set torch uses on it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = cpu_info()
        name = f"cpu {cpu['generation'] or '%s f%d m%d' % (cpu['vendor'], cpu['family'], cpu['model'])} {cpu['capability']}"
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp(device: torch.device, settings: dict) -> dict:
    """Where, when (the start) and with what the run is made, plus the run's settings."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": package_version("triton"),
                **{impl.package or "sftkey": impl.version() for impl in IMPLS.values()}}
    from sftkey.backends.products import describe

    hardware = {"cpu": cpu_info()} if device.type == "cpu" else {}
    return {"device": device_name(device), "device_slug": device_slug(device), **hardware,
            "products": describe(device), "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
            "commit": git_commit(),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"), "versions": versions, **settings,
            "load_average_start": os.getloadavg()[0]}  # other work on the machine shows here


def summarize(case, impl: str, result: dict, pass_: str, errs: dict, ok: bool) -> dict:
    """One table row: status and the derived figures (tokens/s, TFLOP/s, % of the matmul floor)."""
    row = {"case": case.label, "group": case.group, **vars(case), "impl": impl}
    if "times" not in result:
        status = next(k for k in ("skipped", "too slow", "oom", "error") if k in result)
        return {**row, "status": status, "reason": result[status],
                **({"traceback": result["traceback"]} if "traceback" in result else {})}
    t = sorted(result["times"])
    median = statistics.median(t)
    q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0],) * 3
    flops, rate = case.flops(pass_), result["matmul_flops"]
    floor_s = flops * result["kept_tokens"] / case.n / rate  # the products of the tokens that have a loss
    return {**row, "status": "ok" if ok else "FAIL", "times_s": result["times"], "median_s": median,
            "min_s": t[0], "max_s": t[-1], "q1_s": q1, "q3_s": q3, "tokens_per_s": case.n / median,
            "tflops": flops / median / 1e12, "matmul_gflops": rate / 1e9, "floor_s": floor_s,
            "pct_of_floor": 100 * floor_s / median, "extra_mib": result["extra_bytes"] / MIB,
            "rotated_sets": result["rotated_sets"], "rel_err": errs}


STYLES = {"FAIL": "bold red", "error": "red", "oom": "yellow", "too slow": "yellow", "skipped": "dim"}
COLUMNS = ("case", "impl", "status", "median ms", "min–max ms", "tok/s", "TFLOP/s", "% floor",
           "extra MiB", "err loss", "err dX", "err dW")


def _cells(row: dict, first: bool) -> list:
    """A row's cells; the case is named on its first row only, skip reasons go to :func:`notes`."""
    case = row["case"] if first else ""
    if "median_s" not in row:
        return [case, row["impl"], row["status"]] + [""] * (len(COLUMNS) - 3)
    err = row["rel_err"]
    return [case, row["impl"], row["status"], f"{row['median_s'] * 1e3:.1f}",
            f"{row['min_s'] * 1e3:.1f}–{row['max_s'] * 1e3:.1f}", f"{row['tokens_per_s']:,.0f}",
            f"{row['tflops']:.3f}", f"{row['pct_of_floor']:.0f}%", f"{max(row['extra_mib'], 0):,.0f}",
            *(f"{err[k]:.1e}" if k in err else "–" for k in ("loss", "dx", "dw"))]


def _sections(rows: list):
    """``(cells, first row of its case)`` for every row."""
    previous = None
    for row in rows:
        yield _cells(row, row["case"] != previous), row["case"] != previous
        previous = row["case"]


def headline(meta: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in meta["options"].items() if v) or "plain cross-entropy"
    products = meta.get("products", {})
    lowp = ", ".join(f"{t} products in {products[t + '_products']}" for t in ("bfloat16", "float16")
                     if t + "_products" in products)
    env = " ".join(f"{k}={v}" for k, v in meta.get("env", {}).items())
    return (f"{meta['device']} | {meta['commit']} | {meta['date']}, {meta['wall_s']:.0f} s wall, load average "
            f"{meta['load_average_start']:.1f} -> {meta['load_average_end']:.1f}\n"
            f"pass {meta['pass']}, median of {meta['repeats']} runs after {meta['warmup']} warm-up, "
            f"options: {opts}\n"
            f"sftkey: {lowp}" + (f"; env: {env}" if env else "") + "\n"
            f"versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v))


def notes(rows: list, meta: dict) -> list:
    """Footnotes: skip and error reasons (once per implementation and reason), then the legend."""
    lines = list(dict.fromkeys(f"{r['impl']} {r['status']}: {r['reason']}" for r in rows if "reason" in r))
    w32 = dict.fromkeys(f"{4 * r['v'] * r['d'] / MIB:,.0f} MiB at D={r['d']} V={r['v']}" for r in rows
                        if r["dtype"] != "fp32")
    if w32:  # docs/design.md: memory figures state the float32 accumulator of dW apart
        lines.append("extra includes a float32 copy of W's size where an implementation accumulates dW in float32 "
                     "(sftkey for a bf16/fp16 W when N spans more than one group of rows, TRL, Liger here): " + ", ".join(w32))
    rates = [r["matmul_gflops"] for r in rows if "matmul_gflops" in r]
    span = f"{min(rates):,.0f}–{max(rates):,.0f} GFLOP/s" if rates else "none measured"
    lines.append(f"floor = {meta['pass']} matmul FLOPs ({'6' if meta['pass'] == 'fwd-bwd' else '2'}NDV) of the tokens "
                 f"that have a loss, at the best rate of the step's three torch.mm products on one chunk of rows, "
                 f"measured by each implementation's process before and between its timed runs ({span}); TFLOP/s "
                 f"counts every token; extra = peak memory beyond inputs and gradients; "
                 f"err = relative error vs sftkey.reference in float64.")
    return lines


def print_table(rows: list, meta: dict, console) -> None:
    from rich.table import Table

    table = Table(title=headline(meta), title_justify="left")
    for col in COLUMNS:
        table.add_column(col, no_wrap=col != "case")
    for row, (cells, first) in zip(rows, _sections(rows)):
        if first and table.row_count:
            table.add_section()
        table.add_row(*cells, style=STYLES.get(row["status"]))
    console.print(table)
    for line in notes(rows, meta):
        console.print(line, highlight=False)


def markdown(rows: list, meta: dict) -> str:
    lines = ["```", headline(meta), "```", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells, _ in _sections(rows)]
    return "\n".join(lines + [""] + [f"- {line}" for line in notes(rows, meta)] + [""])


def plot(rows: list, meta: dict, path: Path) -> None:
    """Time and extra memory vs N, one column per (model or D, V; dtype), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "median_s" in r]
    groups = list(dict.fromkeys(r["group"] for r in measured))
    if not groups:
        return
    width = max(8.0, 4.5 * len(groups))
    fig, axes = plt.subplots(2, len(groups), figsize=(width, 7.5), squeeze=False)
    lines = {}
    for col, group in enumerate(groups):
        for color, impl in enumerate(IMPLS):
            pts = sorted((r["n"], r["median_s"] * 1e3, r["extra_mib"]) for r in measured
                         if r["group"] == group and r["impl"] == impl)
            if pts:
                ns, ms, mib = zip(*pts)
                lines[impl], = axes[0][col].plot(ns, ms, "o-", color=f"C{color}")
                axes[1][col].plot(ns, mib, "o-", color=f"C{color}")
        axes[0][col].set_title(group, fontsize=9)
        axes[0][col].set_ylabel("median time (ms)")
        axes[1][col].set_ylabel("extra memory (MiB)")
        axes[1][col].set_xlabel("N (tokens)")
        for ax in axes[:, col]:
            ax.set_ylim(bottom=0)
            ax.set_xticks(sorted({r["n"] for r in measured if r["group"] == group}))
    title = "\n".join(textwrap.fill(line, int(width * 16)) for line in headline(meta).splitlines())
    fig.suptitle(title, fontsize=7, ha="left", x=0.01)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / width, 0.9))
    fig.legend(lines.values(), lines.keys(), loc="center right", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list, meta: dict, out: Path, name: str) -> list:
    """Write ``name``.json, .md and .png under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    paths[1].write_text(markdown(rows, meta))
    plot(rows, meta, paths[2])
    return paths
