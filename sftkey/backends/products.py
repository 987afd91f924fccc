"""How the backends form their matrix products: in which dtype, and in which layout.

**Dtype.** Some CPUs have no native bf16 or fp16 matrix product (AVX2-only x86, for one): torch runs
them emulated, 10-70x slower than float32. There the products are formed in float32 from
the bf16/fp16 inputs, slice by slice, and everything comes back in the inputs' dtypes as
elsewhere. :func:`product_dtype` decides per device and dtype, once per process (and thread
count): on CUDA the products are native; on a CPU, no oneDNN path for the dtype means float32,
an instruction set for it (AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16) means native, and
otherwise a small timing of the low-precision product against the float32 one decides (a few
ms, once). ``sftkey.set_lowp_products`` overrides the choice.

**Float32 output.** Recent torch forms a bf16/fp16 product with a float32 result
(``torch.mm(..., out_dtype=torch.float32)``) on CUDA; :func:`float32_output` and
:func:`float32_sums` check once per device type whether this torch has it (the triton
backend's logits and ``dW`` sums).

**Layout.** The same product runs at very different rates on different CPUs depending on
the operands' layout and row count (oneDNN on AMX ran ``dX = dz W`` 1.6x faster plain than as
``(W^T dz^T)^T``, where on a Zen 4 the transposed form was up to 1.6x faster). A
:class:`Ways` holds equivalent ways to form one kind of product and, on the CPU, tries each
on the first calls of a size class and keeps the fastest (``sftkey.config.tune_products``;
off: always the first way).
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Callable

import torch

from .. import config

#: The low-precision input dtypes, whose products may be native, emulated, or float32-output.
LOWP_DTYPES = (torch.bfloat16, torch.float16)
#: The probe's product ``[rows, inner] @ [inner, cols]``: about 67 MFLOP, a few ms even where
#: the low-precision product is emulated at ~10 GFLOP/s. Rounds alternate the two dtypes, so
#: that other work on the machine weighs on both alike; the best of each counts.
_PROBE = (128, 512, 512)
_PROBE_ROUNDS = 7
#: ``torch.cpu`` checks for the instructions that make a dtype's oneDNN products native: where
#: one holds, no timing is needed (it would cost a first call ~7 ms).
_NATIVE_ISA = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
               torch.float16: ("_is_amx_fp16_supported",)}
#: Native means at least this share of the float32 rate. Emulated products run at 1-20% of
#: it; a native path at par with float32 (fp16 through oneDNN on AVX-512 without AMX-FP16)
#: beats up-casting, which adds passes over W.
_NATIVE_SHARE = 0.5


def product_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the torch backend's products of ``dtype`` inputs take on ``device``: ``dtype``
    itself where it is native (or not a low-precision dtype), else float32."""
    if dtype not in LOWP_DTYPES:
        return dtype
    mode = config.lowp_products
    if mode == "native" or (mode == "auto" and (device.type != "cpu" or lowp_native_on_cpu(dtype))):
        return dtype
    return torch.float32


def lowp_native_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` (bf16 or fp16) matrix products natively: oneDNN has a
    path for it, and the CPU has the instructions or the probe product runs at least half as
    fast as in float32."""
    return _native(dtype, torch.get_num_threads())


@lru_cache(maxsize=None)
def _native(dtype: torch.dtype, threads: int) -> bool:
    if not onednn_supports(dtype):
        return False
    if native_isa(dtype):
        return True
    rates = _rates((dtype, torch.float32))
    return rates[dtype] >= _NATIVE_SHARE * rates[torch.float32]


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN (torch's CPU matmul for bf16/fp16) has a path for ``dtype`` on this CPU."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN: only the timing can tell
        return True


def native_isa(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for ``dtype`` products (see ``_NATIVE_ISA``)."""
    return any(getattr(torch.cpu, check, lambda: False)() for check in _NATIVE_ISA[dtype])


def _rates(dtypes) -> dict:
    """FLOP/s of the probe product in each of ``dtypes`` on the CPU: the best of alternating
    rounds after a warm-up."""
    rows, inner, cols = _PROBE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, inner, generator=g), torch.randn(cols, inner, generator=g)
    operands = {dt: (a.to(dt), b.to(dt).t(), torch.empty(rows, cols, dtype=dt)) for dt in dtypes}
    best = dict.fromkeys(dtypes, float("inf"))
    for round_ in range(_PROBE_ROUNDS + 1):
        for dt, (x, w, out) in operands.items():
            start = time.perf_counter()
            torch.mm(x, w, out=out)
            if round_:  # the first round warms up
                best[dt] = min(best[dt], time.perf_counter() - start)
    return {dt: 2 * rows * inner * cols / max(t, 1e-9) for dt, t in best.items()}


def describe(device: torch.device) -> dict:
    """The choice for each low-precision dtype on ``device`` and what it rests on (for benchmark stamps)."""
    info = {"lowp_products": config.lowp_products}
    if device.type == "cpu":
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        for dtype in LOWP_DTYPES:
            name = str(dtype).removeprefix("torch.")
            info[f"{name}_onednn"] = onednn_supports(dtype)
            info[f"{name}_isa"] = native_isa(dtype)
            info[f"{name}_native"] = lowp_native_on_cpu(dtype)
    for dtype in LOWP_DTYPES:
        info[f"{str(dtype).removeprefix('torch.')}_products"] = str(product_dtype(device, dtype)).removeprefix("torch.")
    return info


def mm_float32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` into a float32 ``out`` from bf16/fp16 operands, in one product."""
    torch.mm(a, b, out_dtype=torch.float32, out=out)


def addmm_float32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``c += a @ b`` into a float32 ``c`` from bf16/fp16 operands, in one product."""
    torch.addmm(c, a, b, out_dtype=torch.float32, out=c)


@lru_cache(maxsize=None)
def float32_output(device_type: str, dtype: torch.dtype) -> bool:
    """Whether :func:`mm_float32` runs on ``dtype`` (bf16 or fp16) operands on this device type
    (recent torch on CUDA; not on the CPU)."""
    a = torch.ones(2, 2, dtype=dtype, device=device_type)
    try:
        mm_float32(a, a, torch.empty(2, 2, device=device_type))
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


@lru_cache(maxsize=None)
def float32_sums(device_type: str, dtype: torch.dtype) -> bool:
    """Whether :func:`addmm_float32` adds ``dtype`` products into a float32 sum in place on this
    device type, checked on a small product against its float32 value."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).to(device_type, dtype)
    c = torch.randn(16, 16, generator=g).to(device_type)
    want = c + a.float() @ a.float()
    try:
        addmm_float32(c, a, a)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return torch.allclose(c, want, rtol=1e-4, atol=1e-4)


#: ``way(a, b, out, accumulate)``: ``out = a @ b``, or ``out += a @ b`` where ``accumulate``.
Way = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]


class Ways:
    """Equivalent ways to form one kind of product ``a @ b`` into ``out``, and which one each
    shape takes. A product's *key* is its operands' dimensions rounded up to powers of two,
    their layouts, dtype, device and the thread count, so that the groups of a training run,
    whose last one changes size every step, share a few keys. On the CPU, with tuning on
    (:data:`sftkey.config.tune_products`), a key's first calls try the ways in turn, each call
    forming its product once with the next way and timing it: every way once, then again the
    ways within ``CLOSE`` of the best, up to ``ROUNDS`` timings; from then on the fastest is
    kept. No product runs twice, so a first call costs what a later one does (give or take a
    slower way), but those first calls may differ from the later ones in the last bits.
    Products below :data:`TUNED_FLOP` are not tuned: they take the first way (as with tuning
    off, bitwise repeatable)."""

    #: Timings per way before a key's choice: the first run of a new shape pays oneDNN's set-up.
    ROUNDS = 2
    #: A way slower than this many times the best on its first timing is not timed again.
    CLOSE = 1.25

    def __init__(self, *ways: Way):
        self.ways = ways
        self.chosen: dict = {}
        self.timings: dict = {}

    def __call__(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
        key = _key(a, b)
        way = self.chosen.get(key)
        if way is not None:
            self.ways[way](a, b, out, accumulate)
        elif a.device.type != "cpu" or not config.tune_products or 2 * a.numel() * b.shape[1] < TUNED_FLOP:
            self.ways[0](a, b, out, accumulate)
        else:
            self._try(key, a, b, out, accumulate)

    def _try(self, key, a, b, out, accumulate) -> None:
        """Form the product with the next way to time for ``key`` (:meth:`_pending`), and time it;
        choose once none is pending."""
        timings = self.timings.setdefault(key, [[] for _ in self.ways])
        way = self._pending(timings)[0]
        start = time.perf_counter()
        self.ways[way](a, b, out, accumulate)
        timings[way].append(time.perf_counter() - start)
        if not self._pending(timings):
            best = [min(t) if t else float("inf") for t in timings]
            self.chosen[key] = best.index(min(best))
            del self.timings[key]

    def _pending(self, timings: list) -> list:
        """The ways still to time: each once, then again (to ``ROUNDS``) those within ``CLOSE``
        of the best so far (a slow way is tried once, not twice)."""
        untried = [i for i, t in enumerate(timings) if not t]
        if untried:
            return untried
        best = min(min(t) for t in timings)
        return [i for i, t in enumerate(timings) if len(t) < self.ROUNDS and min(t) <= self.CLOSE * best]


#: The smallest product whose layout is tuned (a few ms at the slowest CPU's rate).
TUNED_FLOP = 1 << 26


def _key(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """What a product's choice of way depends on: its dimensions up to the next power of two,
    which operands are transposed views, dtype, device, threads."""
    dims = (a.shape[0], a.shape[1], b.shape[1])
    layouts = tuple(t.stride(-1) == 1 for t in (a, b))
    return (tuple(max(d - 1, 0).bit_length() for d in dims), layouts, a.dtype, a.device, torch.get_num_threads())


def _plain(a, b, out, accumulate):
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


_MM_ALIGN = 64


def _split_rows(a, b, out, accumulate):
    """The rows up to a multiple of 64, then the rest (oneDNN on a Zen 4 ran 1843 rows ~10%
    slower than 1792 and 51)."""
    cut = a.shape[0] // _MM_ALIGN * _MM_ALIGN
    if cut in (0, a.shape[0]):
        _plain(a, b, out, accumulate)
        return
    _plain(a[:cut], b, out[:cut], accumulate)
    _plain(a[cut:], b, out[cut:], accumulate)


def _transposed(a, b, out, accumulate):
    """``(b^T a^T)^T``: the product with the operands' roles swapped."""
    product = torch.mm(b.t(), a.t()).t()
    if accumulate:
        out.add_(product)
    else:
        out.copy_(product)


def _b_columns(a, b, out, accumulate):
    """``b`` copied with its columns contiguous (``b^T`` row-major) first: a small copy where
    ``b`` has few rows (the hidden states of a group in ``dW = dz^T X``)."""
    _plain(a, b.t().contiguous().t(), out, accumulate)


#: ``X W^T`` (logits), ``dz W`` (dX) and ``dz^T X`` (dW), each the first way unless tuned.
LOGITS = Ways(_plain, _split_rows)
DX = Ways(_plain, _split_rows, _transposed)
DW = Ways(_plain, _b_columns)
