"""Settings shared by the backends."""
from __future__ import annotations

import os

_MIB = 1 << 20

#: Bytes of logits (in the input dtype) one group of rows may hold in the chunked torch
#: backend; its float32 blocks add an eighth of it (up to three eighths with the entropy
#: and the soft-cap). This bounds the extra memory; a bf16/fp16 ``dW`` adds one float32
#: buffer of W's size, or, where every row fits in one group within the budget plus that
#: buffer's bytes, spends them on the group instead.
#: Set with :func:`set_chunk_budget` or the ``SFTKEY_CHUNK_MIB`` environment variable.
chunk_budget_bytes: int = int(float(os.environ.get("SFTKEY_CHUNK_MIB", "48")) * _MIB)


def set_chunk_budget(mib: float) -> None:
    """Set the torch backend's per-block logits budget, in MiB (> 0)."""
    global chunk_budget_bytes
    if not mib > 0:
        raise ValueError(f"mib must be > 0, got {mib!r}")
    chunk_budget_bytes = int(mib * _MIB)
