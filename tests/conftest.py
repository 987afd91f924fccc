"""Shared test set-up: which backends run, input factories; the tolerances per dtype are
:mod:`sftkey.testing`'s (stated once, for the tests and the benchmark).

Without a GPU the Triton backend runs under the interpreter, which must be switched on
before ``triton`` is first imported; that happens here."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the examples' modules (examples/program_lm.py: a model computed by a program) for the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from sftkey.core.driver import triton_usable  # noqa: E402
from sftkey.testing import TOLERANCE, assert_close, rel_err  # noqa: E402,F401  (the tests import them from here)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernel_device():
    """Where the Triton kernels run in this session: compiled on CUDA, interpreted on the CPU
    (``TRITON_INTERPRET=1`` set before triton was imported), else nowhere (None)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from sftkey.kernels.configs import INTERPRETED
    if torch.cuda.is_available() and not INTERPRETED:
        return torch.device("cuda")
    return torch.device("cpu") if INTERPRETED else None


KERNEL_DEVICE = _kernel_device()
#: For the tests of the kernels themselves: compiled on CUDA, interpreted on CPU, else skipped.
needs_kernels = pytest.mark.skipif(KERNEL_DEVICE is None, reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 "
                                   "set before triton is imported (tests/conftest.py does so without CUDA)")
#: With the `gpu` marker (pyproject.toml), for the tests that only mean something compiled on a GPU.
needs_cuda = pytest.mark.skipif(KERNEL_DEVICE is None or KERNEL_DEVICE.type != "cuda",
                                reason="needs a CUDA device (compiled Triton kernels)")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def backends():
    """Fast backends under test: torch always, both Triton paths where they can run (CUDA or
    the interpreter)."""
    names = ["torch"]
    if triton_usable(DEVICE):
        names += ["triton", "triton-fused"]
    return names


def make_head(n, d, v, dtype, *, seed, bias=False, device=DEVICE, ignore_frac=0.2, lead=None):
    """Random ``hidden [*lead or n, d]``, ``weight [v, d]`` (logits of order 1), ``targets``
    with about ``ignore_frac`` set to -100, and optionally ``bias [v]``; all leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if lead else (n,)
    x = torch.randn(*shape, d, generator=g)
    w = torch.randn(v, d, generator=g) / d ** 0.5
    y = torch.randint(0, v, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    cast = [t.to(device=device, dtype=dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    return (*cast, y.to(device))


@pytest.fixture(autouse=True)
def _one_thread():
    """The suite's shapes are tiny: intra-op threads gain nothing there, and on a loaded
    2-core machine the thread pool's synchronisation costs far more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=backends())
def backend(request):
    return request.param


def force_ways(monkeypatch, index: int) -> None:
    """Make every product of the torch backend take way ``index`` (modulo its number of ways)."""
    from sftkey.backends import products

    class Always(dict):
        def __init__(self, count):
            super().__init__()
            self.way = index % count

        def get(self, key, default=None):
            return self.way

    for ways in (products.LOGITS, products.DX, products.DW):
        monkeypatch.setattr(ways, "chosen", Always(len(ways.ways)))


def reads_gaps(ways):
    """A product ``a @ b`` as a BLAS that reads the gap between a row-strided ``a``'s rows forms
    it (oneDNN's bf16 product on AMX, torch 2.13): ``a``'s full rows times ``b`` padded with
    zero rows, so anything but a finite value in the gap spoils the result (``0 * NaN``)."""

    def product(a, b, out, accumulate=False):
        gap = a.stride(0) - a.shape[1]
        if a.stride(1) == 1 and gap > 0:
            a, b = a.as_strided((a.shape[0], a.stride(0)), a.stride()), torch.cat([b, b.new_zeros(gap, b.shape[1])])
        ways(a, b, out, accumulate)

    return product


@pytest.fixture
def single_rank(tmp_path):
    """A one-process gloo group in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
