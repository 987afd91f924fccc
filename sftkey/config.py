"""Settings of the torch backend: the memory of one group of rows, and the dtype of its products."""
from __future__ import annotations

import os

_MIB = 1 << 20

#: Bytes of logits (in the products' dtype) one group of rows may hold in the chunked torch
#: backend; its float32 blocks add an eighth of it (up to three eighths with the entropy
#: and the soft-cap). This bounds the extra memory; a bf16/fp16 ``dW`` adds one float32
#: buffer of W's size, or, where every row fits in one group within the budget plus that
#: buffer's bytes, spends them on the group instead.
#: Set with :func:`set_chunk_budget` or the ``SFTKEY_CHUNK_MIB`` environment variable.
chunk_budget_bytes: int = int(float(os.environ.get("SFTKEY_CHUNK_MIB", "48")) * _MIB)

LOWP_MODES = ("auto", "native", "float32")

#: How the torch backend forms the matrix products of bf16/fp16 inputs: ``"auto"`` (in the
#: inputs' dtype where the device runs it natively, else in float32 from the inputs),
#: ``"native"`` (always in the inputs' dtype) or ``"float32"`` (always in float32).
#: Results are those of the contract either way. Set with :func:`set_lowp_products` or the
#: ``SFTKEY_LOWP_PRODUCTS`` environment variable.
lowp_products: str = os.environ.get("SFTKEY_LOWP_PRODUCTS", "auto")
if lowp_products not in LOWP_MODES:
    raise ValueError(f"SFTKEY_LOWP_PRODUCTS must be one of {LOWP_MODES}, got {lowp_products!r}")


#: Whether the torch backend times the equivalent layouts of each matrix product on its
#: first call for a shape and keeps the fastest (CPU only; :mod:`sftkey.backends.products`).
#: Off (``SFTKEY_TUNE_PRODUCTS=0``): one fixed layout, for bitwise-repeatable runs.
tune_products: bool = os.environ.get("SFTKEY_TUNE_PRODUCTS", "1") not in ("0", "false", "off")


def set_chunk_budget(mib: float) -> None:
    """Set the torch backend's per-group logits budget, in MiB (> 0)."""
    global chunk_budget_bytes
    if not mib > 0:
        raise ValueError(f"mib must be > 0, got {mib!r}")
    chunk_budget_bytes = int(mib * _MIB)


def set_lowp_products(mode: str) -> None:
    """Set how the torch backend forms bf16/fp16 matrix products: "auto", "native" or "float32"."""
    global lowp_products
    if mode not in LOWP_MODES:
        raise ValueError(f"mode must be one of {LOWP_MODES}, got {mode!r}")
    lowp_products = mode
