"""Verification: relative errors of the loss, dX and dW against ``sftkey.reference`` in float64,
held to the tolerances of :mod:`sftkey.testing` (those of the tests)."""
from __future__ import annotations

import math

import torch
from sftkey.testing import TOLERANCE as _BY_DTYPE
from sftkey.testing import rel_err

from .cases import DTYPES, IGNORE_INDEX, Case, Inputs, Options

#: Largest relative error that passes, per dtype name.
TOLERANCE = {name: _BY_DTYPE[dtype] for name, dtype in DTYPES.items()}
#: The oracle materializes float64 logits; it runs on blocks of rows of at most this size.
BLOCK_BYTES = 256 << 20


def reference(case: Case, opts: Options, inputs: Inputs, pass_: str) -> dict:
    """Loss, dX, dW (float64, on the CPU) of ``sftkey.reference.linear_cross_entropy`` on ``inputs``
    cast to float64, computed on row blocks normalized by the whole batch's denominator."""
    from sftkey.reference import linear_cross_entropy

    grad = pass_ == "fwd-bwd"
    x = inputs.x.detach().double().requires_grad_(grad)
    w = inputs.w.detach().double().requires_grad_(grad)
    y, a = inputs.y, inputs.token_weights
    valid = y != IGNORE_INDEX
    denom = (valid.double() if a is None else a.double() * valid).sum()
    rows = max(1, BLOCK_BYTES // (case.v * 8))
    loss = 0.0
    with torch.set_grad_enabled(grad):
        for start in range(0, case.n, rows):
            r = slice(start, start + rows)
            block = linear_cross_entropy(x[r], w, y[r], **opts.sftkey_kwargs(None if a is None else a[r]),
                                         normalizer=denom)
            if grad:
                block.backward()
            loss += block.item()
    return {"loss": loss, "grads": [x.grad.cpu(), w.grad.cpu()] if grad else []}


def errors(outputs: dict, ref: dict) -> dict:
    """Relative errors of an implementation's saved ``outputs`` against the reference."""
    errs = {"loss": abs(outputs["loss"].double().item() - ref["loss"]) / max(abs(ref["loss"]), 1e-30)}
    for name, value, r in zip(("dx", "dw"), outputs["grads"], ref["grads"]):
        errs[name] = rel_err(value, r)
    return errs


def passes(errs: dict, dtype: str) -> bool:
    return all(math.isfinite(e) and e <= TOLERANCE[dtype] for e in errs.values())
