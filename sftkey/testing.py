"""The accuracy every result is held to: relative errors against the float64 oracle, one
tolerance per input dtype. The tests and the benchmark's verification both use this table."""
from __future__ import annotations

import math

import torch

#: Largest relative error ``||got - want|| / ||want||`` (Frobenius; absolute where ``want``
#: is 0) against the float64 reference, per input dtype.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def rel_err(got: torch.Tensor, want: torch.Tensor, rows: int = 4096) -> float:
    """``||got - want|| / ||want||``, accumulated in float64 over blocks of ``rows`` rows."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if want.dim() == 0:
        got, want = got.reshape(1), want.reshape(1)
    num = den = 0.0
    for start in range(0, want.shape[0], rows):
        w = want[start:start + rows].double()
        num += (got[start:start + rows].double() - w).square().sum().item()
        den += w.square().sum().item()
    return math.sqrt(num / den) if den else math.sqrt(num)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``got`` has ``want``'s shape, is finite, and is within ``TOLERANCE[dtype]`` of it."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got.double()).all(), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:.1g} ({dtype})"
