"""Time and peak memory of an implementation, in a fresh process per implementation.

A :class:`Worker` (in the parent) hands cases to its process; for each, the process builds
the inputs and warms up (:meth:`Worker.prepare`), makes one timed run at a time on the
parent's call (:meth:`Worker.run`), rotating among the input sets and probing the matmul
rate after each, then (:meth:`Worker.finish`) makes one more run on input set 0 that measures
the peak memory above what was allocated before it and saves the loss and gradients for
verification. The parent can so interleave the implementations' timed runs. See NOTES.md.
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from .cases import DTYPES, IGNORE_INDEX, Case, Options, input_sets
from .peers import IMPLS, Skip

WARMUP = 2
PROBES_BEFORE, PROBES_BETWEEN = 4, 1
#: Seconds past the budget after which a busy worker is killed (a run that never ends).
KILL_GRACE_S = 30


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


def matmul_probe(device: torch.device, dtype: str, d: int, v: int):
    """A function that times the three products of a training step on one chunk of rows,
    into preallocated outputs, and returns their FLOP/s: ``[rows, D] @ [D, cols]`` (logits),
    ``[rows, cols] @ [cols, D]`` (dX) and ``[cols, rows] @ [rows, D]`` (dW), with ``cols`` up to
    the case's vocabulary. The matrix-product rate that bounds every implementation here;
    CPUs with AMX run small cache-resident products several times faster than these, so the
    probe keeps the case's operand sizes. Its dtype is the case's where the device runs it
    natively, else float32 (where bf16/fp16 products are emulated, the fastest way to form
    the products of such inputs)."""
    from sftkey.backends.products import product_dtype

    rows, cols = (8192, min(v, 65536)) if device.type == "cuda" else (256, min(v, 32768))
    g = torch.Generator(device).manual_seed(0)
    dt = product_dtype(device, DTYPES[dtype])
    make = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dt)  # noqa: E731
    x, w, dz = make(rows, d), make(cols, d), make(rows, cols)
    z, dx, dw = make(rows, cols), make(rows, d), make(cols, d)

    def products():
        torch.mm(x, w.t(), out=z)
        torch.mm(dz, w, out=dx)
        torch.mm(dz.t(), x, out=dw)

    return lambda: 6 * rows * cols * d / elapsed(device, products)


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


class TooSlow(Exception):
    """The implementation would take longer than the case's time budget; the message says how long one run takes."""


class CaseRuns:
    """One case in a worker: the loss built for it, its input sets and the first warm-up run
    at construction, the others in :meth:`warm`, then one timed run per :meth:`run` and the
    memory run in :meth:`finish`. Each raises :class:`TooSlow` when the first run alone, or
    the runs after the second at the second's pace, would take more than ``spec["budget_s"]``
    seconds."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.device = device = torch.device(spec["device"])
        opts = Options(**spec["opts"])
        fn = IMPLS[spec["impl"]].build(opts, device)
        self.sets = input_sets(Case(**spec["case"]), opts, device)
        if spec["pass"] == "fwd-bwd":
            for s in self.sets:
                s.x.requires_grad_()
                s.w.requires_grad_()
        self.step = make_step(fn, spec["pass"])
        self.times, self.rates = [], []
        self._warm_up(0)  # compiles, where there is anything to compile

    def warm(self) -> dict:
        """The other warm-up runs; then the probes of the matrix-product rate begin."""
        for i in range(1, WARMUP):
            self._warm_up(i)
        case = self.spec["case"]
        self.probe = matmul_probe(self.device, case["dtype"], case["d"], case["v"])
        self.rates = [self.probe() for _ in range(PROBES_BEFORE)]
        return {"ready": True}

    def _warm_up(self, i: int) -> None:
        """Warm-up run ``i``; :class:`TooSlow` if the first takes more than the budget, or a
        later one shows that the runs left would."""
        budget, runs_left = self.spec["budget_s"], WARMUP + self.spec["repeats"] - i  # and the memory run
        run_s = elapsed(self.device, self.step, self.sets[i % len(self.sets)])
        if run_s * (runs_left if i else 1) > budget:
            raise TooSlow(f"one run took {run_s:.1f} s; {runs_left} more would pass the {budget:g} s budget"
                          if i else f"the first run took {run_s:.1f} s, more than the {budget:g} s budget")

    def run(self) -> dict:
        """One timed run on the next input set, then probes of the matrix-product rate (the best
        rate of the same stretch of time as the runs)."""
        inputs = self.sets[(WARMUP + len(self.times)) % len(self.sets)]
        self.times.append(elapsed(self.device, self.step, inputs))
        self.rates += [self.probe() for _ in range(PROBES_BETWEEN)]
        return {"time_s": self.times[-1]}

    def finish(self) -> dict:
        """The memory run on input set 0, its outputs saved to ``spec["outputs"]``; the summary."""
        del self.probe
        (loss, grads), peak = peak_memory(self.device, self.step, self.sets[0])
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        torch.save({"loss": loss.detach().cpu(), "grads": [g.cpu() for g in grads]}, self.spec["outputs"])
        kept = sum(int((s.y != IGNORE_INDEX).sum()) for s in self.sets) / len(self.sets)
        return {"times": self.times, "extra_bytes": peak - grad_bytes, "matmul_flops": max(self.rates),
                "rotated_sets": len(self.sets), "kept_tokens": kept}


def _failure(e: BaseException) -> dict:
    """A failed step as a result: skipped, too slow, out of memory (an outcome on large shapes,
    not a failure of the run) or an error (reported in the table and the JSON, not fatal)."""
    if isinstance(e, Skip):
        return {"skipped": str(e)}
    if isinstance(e, TooSlow):
        return {"too slow": str(e)}
    if isinstance(e, torch.OutOfMemoryError):
        return {"oom": "out of memory"}
    return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "traceback": traceback.format_exc()}


def _release() -> None:
    """Leave nothing of a case (compiled graphs, cached device memory) to weigh on the next one or on other workers."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _serve(conn) -> None:
    """The worker's loop: ``(op, spec)`` in ("prepare", "warm", "run", "finish"), a result out, until
    ``None`` (or the parent is gone). Its output is dropped so that it does not break the
    parent's progress bar."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    case = None
    try:
        for op, spec in iter(conn.recv, None):
            try:
                if op == "prepare":
                    case = CaseRuns(spec)
                    result = {"started": True}
                else:
                    result = getattr(case, op)()
            except Exception as e:
                result = _failure(e)
            if op == "finish" or not {"started", "ready", "time_s"} & set(result):
                case = None
                _release()
            conn.send(result)
    except EOFError:
        pass


class Worker:
    """A fresh process for one implementation, kept for all the cases of a run so that imports
    happen once; it is restarted if it dies. Per case: :meth:`prepare`, :meth:`run` once per
    timed run, :meth:`finish`; each returns a failure (``skipped``, ``too slow``, ``oom``,
    ``error``) where the case cannot go on. A process still busy after the budget and a grace
    period (a run that never ends) is killed."""

    def __init__(self, impl: str):
        self.impl, self.proc = impl, None

    def prepare(self, case: Case, opts: Options, pass_: str, device: str, repeats: int, outputs: Path,
                budget_s: float) -> dict:
        """Build the loss and inputs of ``case`` and warm up: ``{"ready": True}`` or a failure."""
        if self.proc is None or not self.proc.is_alive():
            ctx = multiprocessing.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_serve, args=(child,))
            self.proc.start()
        self.budget_s, self.outputs = budget_s, outputs
        spec = {"impl": self.impl, "case": vars(case), "opts": vars(opts), "pass": pass_, "device": device,
                "repeats": repeats, "outputs": str(outputs), "budget_s": budget_s}
        started = self._ask("prepare", spec)
        return self._ask("warm") if "started" in started else started

    def run(self) -> dict:
        """One timed run: ``{"time_s": ...}`` or a failure."""
        return self._ask("run")

    def finish(self) -> dict:
        """The memory run and the case's results; they have ``outputs`` (the saved loss and
        gradients) when it ran."""
        result = self._ask("finish")
        return {**result, "outputs": str(self.outputs)} if "times" in result else result

    def _ask(self, op: str, spec: Optional[dict] = None) -> dict:
        self.conn.send((op, spec))
        if not self.conn.poll(self.budget_s + KILL_GRACE_S):
            self.proc.kill()
            self.proc.join()
            return {"too slow": f"a run did not end within the {self.budget_s:g} s budget"}
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join()
            return {"error": f"worker died with exit code {self.proc.exitcode}"}

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join()
