"""Batch collation for token-weighted training: pads ids, masks, labels and per-token weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from .keys import IGNORE_INDEX

# key -> (padding value, dtype); input_ids pads with the collator's pad_token_id.
_PADDED = {
    "attention_mask": (0, torch.long),
    "labels": (IGNORE_INDEX, torch.long),
    "token_weights": (0.0, torch.float32),
    "entropy_weights": (0.0, torch.float32),
}


@dataclass
class TokenWeightCollator:
    """Pad a list of features (``input_ids`` and any of ``attention_mask``, ``labels``,
    ``token_weights``, ``entropy_weights``, each a per-token list or 1-D tensor) into a batch
    of tensors; usable as a ``transformers.Trainer`` ``data_collator``.

    Padding uses ``pad_token_id`` for ids, 0 for the mask (built from the lengths when absent),
    -100 for labels and 0.0 for weights, on ``padding_side``, to a length that is a multiple
    of ``pad_to_multiple_of`` when given. An optional key must be in every feature or none;
    other keys are refused (remove the dataset's text columns first).
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise TypeError(f"pad_token_id: expected an int, got {type(self.pad_token_id).__name__}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {self.padding_side!r}")
        multiple = self.pad_to_multiple_of
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {multiple!r}")

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "TokenWeightCollator":
        """Take ``pad_token_id`` (else ``eos_token_id``) and ``padding_side`` from ``tokenizer``."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer: has neither a pad_token_id nor an eos_token_id; pass pad_token_id")
        kwargs.setdefault("padding_side", getattr(tokenizer, "padding_side", "right"))
        return cls(pad_token_id=pad, **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("features: expected at least one feature")
        keys = set(features[0])
        for i, feature in enumerate(features):
            if set(feature) != keys:
                raise ValueError(f"features[{i}]: keys {sorted(feature)} differ from features[0]'s {sorted(keys)}")
        unknown = keys - {"input_ids", *_PADDED}
        if "input_ids" not in keys or unknown:
            raise ValueError(f"features: expected input_ids and any of {sorted(_PADDED)}; unexpected {sorted(unknown)}")

        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        for i, t in enumerate(ids):
            if t.dim() != 1:
                raise ValueError(f"features[{i}]['input_ids']: expected one sequence (1-D), got shape {tuple(t.shape)}")
        length = max(len(t) for t in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": self._pad(ids, length, self.pad_token_id, torch.long)}
        if "attention_mask" not in keys:
            batch["attention_mask"] = self._pad([torch.ones_like(t) for t in ids], length, 0, torch.long)
        for key in sorted(keys & set(_PADDED)):
            value, dtype = _PADDED[key]
            rows = [torch.as_tensor(f[key], dtype=dtype) for f in features]
            for i, (row, t) in enumerate(zip(rows, ids)):
                if row.shape != t.shape:
                    raise ValueError(
                        f"features[{i}][{key!r}]: shape {tuple(row.shape)}, expected {tuple(t.shape)} like input_ids"
                    )
            batch[key] = self._pad(rows, length, value, dtype)
        return batch

    def _pad(self, rows: list[torch.Tensor], length: int, value, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=dtype)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out
