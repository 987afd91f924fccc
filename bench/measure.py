"""Time and peak memory of an implementation, in a fresh process per implementation.

A :class:`Worker` (in the parent) hands cases to its process; for each, the process builds
the inputs, warms up, times ``repeats`` runs rotating among the input sets while probing the
matmul rate between them, then makes one more run on input set 0 that measures the peak
memory above what was allocated before it and saves the loss and gradients for verification.
See NOTES.md.
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import time
import traceback
from pathlib import Path

import torch

from .cases import DTYPES, Case, Options, input_sets
from .peers import IMPLS, Skip

WARMUP = 2


def elapsed(device: torch.device, fn, *args) -> float:
    """Seconds ``fn(*args)`` takes: CUDA events on CUDA, ``perf_counter`` elsewhere. The
    result is dropped, so nothing of one run stays alive into the next."""
    if device.type == "cuda":
        begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        torch.cuda.synchronize(device)
        begin.record()
        fn(*args)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(device: torch.device, fn, *args) -> tuple:
    """``(fn(*args), peak bytes above what was allocated before the call)``.

    CUDA: ``max_memory_allocated``. CPU (Linux): peak RSS. ``malloc_trim`` first hands the
    memory glibc keeps from freed blocks back to the kernel, so RSS is what is live; the
    kernel's high-water mark ``VmHWM`` is then reset through ``/proc/self/clear_refs``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(*args)
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_bytes("VmRSS")
    out = fn(*args)
    return out, _proc_status_bytes("VmHWM") - base


def matmul_probe(device: torch.device, dtype: str, d: int):
    """A function that times one chunk-sized ``torch.mm`` (``[rows, D] @ [D, cols]`` into a
    preallocated output) and returns its FLOP/s: the matrix-product rate that bounds every
    implementation here."""
    rows, cols = (8192, 16384) if device.type == "cuda" else (1024, 4096)
    a = torch.randn(rows, d, device=device).to(DTYPES[dtype])
    b = torch.randn(cols, d, device=device).to(DTYPES[dtype])
    out = torch.empty(rows, cols, device=device, dtype=DTYPES[dtype])
    return lambda: 2 * rows * cols * d / elapsed(device, lambda: torch.mm(a, b.T, out=out))


def make_step(fn, pass_: str):
    """One run: the loss (no autograd graph) for ``fwd``; loss, ``(dX, dW)`` for ``fwd-bwd``."""
    if pass_ == "fwd":
        def step(inputs):
            with torch.no_grad():
                return fn(*inputs), ()
    else:
        def step(inputs):
            loss = fn(*inputs)
            return loss, torch.autograd.grad(loss, (inputs.x, inputs.w))
    return step


def measure(spec: dict) -> dict:
    """The child's work: times, peak extra memory, and the outputs saved to ``spec["outputs"]``."""
    device = torch.device(spec["device"])
    opts = Options(**spec["opts"])
    fn = IMPLS[spec["impl"]].build(opts, device)
    sets = input_sets(Case(**spec["case"]), opts, device)
    if spec["pass"] == "fwd-bwd":
        for s in sets:
            s.x.requires_grad_()
            s.w.requires_grad_()
    step = make_step(fn, spec["pass"])
    for i in range(WARMUP):
        step(sets[i % len(sets)])
    probe = matmul_probe(device, spec["case"]["dtype"], spec["case"]["d"])
    rates = [probe() for _ in range(20)]
    times = []
    for i in range(WARMUP, WARMUP + spec["repeats"]):
        times.append(elapsed(device, step, sets[i % len(sets)]))
        rates += [probe() for _ in range(3)]  # the best rate of the same stretch of time as the runs
    del probe
    (loss, grads), peak = peak_memory(device, step, sets[0])
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    torch.save({"loss": loss.detach().cpu(), "grads": [g.cpu() for g in grads]}, spec["outputs"])
    return {"times": times, "extra_bytes": peak - grad_bytes, "matmul_flops": max(rates), "rotated_sets": len(sets)}


def _run(spec: dict) -> dict:
    """:func:`measure` with its failures turned into results; afterwards nothing of the case
    stays (compiled graphs, cached device memory) to weigh on the next one or on other workers."""
    try:
        return measure(spec)
    except Skip as e:
        return {"skipped": str(e)}
    except torch.OutOfMemoryError:  # an outcome on large shapes, not a failure of the run
        return {"oom": "out of memory"}
    except Exception as e:  # reported in the table and the JSON, not fatal to the run
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "traceback": traceback.format_exc()}
    finally:
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


def _serve(conn) -> None:
    """The worker's loop: a spec in, a result out, until ``None`` (or the parent is gone).
    Its output is dropped so that it does not break the parent's progress bar."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        for spec in iter(conn.recv, None):
            conn.send(_run(spec))
    except EOFError:
        pass


class Worker:
    """A fresh process for one implementation, kept for all the cases of a run so that imports
    happen once; it is restarted if it dies."""

    def __init__(self, impl: str):
        self.impl, self.proc = impl, None

    def run(self, case: Case, opts: Options, pass_: str, device: str, repeats: int, outputs: Path) -> dict:
        """Measure ``case``; the result has ``outputs`` (the saved loss and gradients) when it ran,
        else ``skipped``, ``oom`` or ``error``."""
        if self.proc is None or not self.proc.is_alive():
            ctx = multiprocessing.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_serve, args=(child,))
            self.proc.start()
        spec = {"impl": self.impl, "case": vars(case), "opts": vars(opts), "pass": pass_, "device": device,
                "repeats": repeats, "outputs": str(outputs)}
        self.conn.send(spec)
        try:
            result = self.conn.recv()
        except EOFError:
            self.proc.join()
            return {"error": f"worker died with exit code {self.proc.exitcode}"}
        return {**result, "outputs": str(outputs)} if "times" in result else result

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join()
