"""Token weights from the data to the batch: per-token weights from character spans
(:func:`span_weights`; SFTKey's key answer, :func:`key_weight_spans`; CFT's critical tokens,
:func:`critical_weight_spans`), and the collator that pads or flattens ids, labels and
per-token weights (:class:`TokenWeightCollator`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from . import keys
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

    ``padding_free=True`` flattens the features into one row ``[1, N]`` instead (no attention
    mask: a feature's ``attention_mask`` must be all ones): ``position_ids`` restart at 0 at
    each sequence, where ``labels`` become -100 (a sequence's first token is no target of the
    one before), and the varlen attention arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k``
    (int32 ``[S + 1]``), ``max_length_q`` / ``max_length_k`` and ``seq_idx`` (int32 ``[1,
    N]``) come with them, as TRL's padding-free collator gives them, and ``use_cache=False``:
    transformers builds the block-diagonal mask from the ``position_ids`` only without a cache,
    and a model called with its config's ``use_cache=True`` would attend across the sequences.
    A feature holding several packed sequences (TRL's packing) gives their lengths as
    ``seq_lengths``. The loss and every gradient equal the padded batch's.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: Optional[int] = None
    padding_free: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise TypeError(f"pad_token_id: expected an int, got {type(self.pad_token_id).__name__}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {self.padding_side!r}")
        multiple = self.pad_to_multiple_of
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {multiple!r}")
        if not isinstance(self.padding_free, bool):
            raise TypeError(f"padding_free: expected a bool, got {type(self.padding_free).__name__}")

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
        known = {"input_ids", *_PADDED, *(("seq_lengths",) if self.padding_free else ())}
        unknown = keys - known
        if "input_ids" not in keys or unknown:
            raise ValueError(f"features: expected input_ids and any of {sorted(known - {'input_ids'})}; "
                             f"unexpected {sorted(unknown)}"
                             + (" (packed sequences: padding_free=True)" if "seq_lengths" in unknown else ""))

        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        for i, t in enumerate(ids):
            if t.dim() != 1:
                raise ValueError(f"features[{i}]['input_ids']: expected one sequence (1-D), got shape {tuple(t.shape)}")
        rows = {"input_ids": ids}
        for key in sorted(keys & set(_PADDED)):
            rows[key] = [torch.as_tensor(f[key], dtype=_PADDED[key][1]) for f in features]
            for i, (row, t) in enumerate(zip(rows[key], ids)):
                if row.shape != t.shape:
                    raise ValueError(
                        f"features[{i}][{key!r}]: shape {tuple(row.shape)}, expected {tuple(t.shape)} like input_ids"
                    )
        if self.padding_free:
            return self._flatten(rows, [f.get("seq_lengths") for f in features])
        length = self._padded_length(max(len(t) for t in ids))
        batch = {"input_ids": self._pad(ids, length, self.pad_token_id, torch.long)}
        if "attention_mask" not in keys:
            batch["attention_mask"] = self._pad([torch.ones_like(t) for t in ids], length, 0, torch.long)
        for key in sorted(keys & set(_PADDED)):
            value, dtype = _PADDED[key]
            batch[key] = self._pad(rows[key], length, value, dtype)
        return batch

    def _padded_length(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return -(-length // multiple) * multiple if multiple else length

    def _flatten(self, rows: dict[str, list[torch.Tensor]], seq_lengths: list) -> dict[str, Any]:
        """The padding-free batch of the per-feature ``rows`` (see the class docstring)."""
        for i, mask in enumerate(rows.pop("attention_mask", [])):
            if not bool(mask.all()):
                raise ValueError(f"features[{i}]['attention_mask']: has zeros; padding_free=True needs unpadded "
                                 "features (the mask is all ones)")
        lengths = []
        for i, (t, packed) in enumerate(zip(rows["input_ids"], seq_lengths)):
            packed = [len(t)] if packed is None else [int(n) for n in packed]
            if sum(packed) != len(t) or min(packed, default=1) < 1:
                raise ValueError(f"features[{i}]['seq_lengths']: {packed} do not split its {len(t)} tokens")
            lengths.extend(packed)
        total = sum(lengths)
        length = self._padded_length(total)
        positions = torch.zeros(length, dtype=torch.long)
        positions[:total] = torch.cat([torch.arange(n) for n in lengths]) if lengths else positions[:0]
        batch = {"input_ids": torch.full((1, length), self.pad_token_id, dtype=torch.long)}
        batch["input_ids"][0, :total] = torch.cat(rows.pop("input_ids"))
        for key, parts in rows.items():
            value, dtype = _PADDED[key]
            batch[key] = torch.full((1, length), value, dtype=dtype)
            batch[key][0, :total] = torch.cat(parts)
        starts = (positions == 0).nonzero().flatten()  # each padding token is a sequence of its own
        if "labels" in batch:
            batch["labels"][0, starts] = IGNORE_INDEX
        batch["position_ids"] = positions[None]
        cu_seq_lens = torch.cat([starts, torch.tensor([length])]).to(torch.int32)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
        batch["max_length_q"] = batch["max_length_k"] = int(cu_seq_lens.diff().max()) if length else 0
        batch["seq_idx"] = torch.repeat_interleave(torch.arange(len(starts), dtype=torch.int32),
                                                   cu_seq_lens.diff())[None]
        batch["use_cache"] = False
        return batch

    def _pad(self, rows: list[torch.Tensor], length: int, value, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=dtype)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out


def span_weights(offset_mapping: Sequence[Sequence[int]], spans: Sequence[Sequence[float]],
                 outside_weight: float) -> list[float]:
    """Per token, the largest weight of the ``spans`` (``(start, end, weight)``, characters
    ``[start, end)``) its ``offset_mapping`` ``[s, e)`` overlaps, else ``outside_weight``
    (zero-width tokens overlap no span)."""
    out = []
    for s, e in offset_mapping:
        hits = [w for start, end, w in spans if e > s and s < end and e > start]
        out.append(max(hits) if hits else outside_weight)
    return out


def check_spans(spans: Any, text_length: int, where: str) -> list[tuple[int, int, float]]:
    """``spans`` as ``(start, end, weight)`` tuples: integral ``0 <= start < end <=
    text_length + 1`` (one character past the text names the token that directly follows it),
    a finite weight >= 0; ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"{where}: expected a list of [start, end, weight], got {type(spans).__name__}")
    checked = []
    for span in spans:
        if not isinstance(span, (list, tuple)) or len(span) != 3:
            raise ValueError(f"{where}: expected [start, end, weight] spans, got {span!r}")
        start, end, weight = (float(v) for v in span)
        if not (start.is_integer() and end.is_integer() and 0 <= start < end <= text_length + 1):
            raise ValueError(f"{where}: span {list(span)} is not a character range within the text's "
                             f"{text_length} characters and the token after them (0 <= start < end <= "
                             f"{text_length + 1})")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}: span {list(span)} has a weight that is not finite and >= 0")
        checked.append((int(start), int(end), weight))
    return checked


def key_weight_spans(response: str, key_weight: float = 1.0, include_eos: bool = True,
                     **find_key_span_options) -> list[list]:
    """SFTKey's key answer of ``response`` as weight spans: ``[[start, end, key_weight]]``, and
    with ``include_eos`` (as :func:`sftkey.methods.keys.build_features`' stage 2) the token that
    directly follows the response (the end of sequence, or a chat template's end of turn:
    ``[len(response), len(response) + 1, key_weight]``); ``[]`` without a key (options:
    :func:`sftkey.methods.keys.find_key_span`'s). With a trainer's ``outside_weight`` of 0 that
    is stage 2; of ``cot_weight``, a blend."""
    span = keys.find_key_span(response, **find_key_span_options)
    if span is None:
        return []
    end = [[len(response), len(response) + 1, float(key_weight)]] if include_eos else []
    return [[span[0], span[1], float(key_weight)]] + end


def critical_weight_spans(tokenizer, response_ids: Sequence[int], positions: Sequence[int],
                          weight: float = 1.0) -> tuple[str, list[list]]:
    """CFT's critical tokens as weight spans: ``(response text, [[start, end, weight], ...])``,
    the text decoded from ``response_ids`` and a span per critical position (e.g.
    :meth:`sftkey.methods.critical.CriticalResult.critical`). ``ValueError`` when the tokenizer
    does not encode the decoded text back to ``response_ids`` (the spans would be of other tokens)."""
    text = tokenizer.decode(list(response_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(response_ids):
        raise ValueError("response_ids: the tokenizer does not encode their decoded text back to them, so "
                         "character spans cannot name these tokens; train on the token features instead "
                         "(CriticalResult.features with TokenWeightCollator)")
    offsets = enc["offset_mapping"]
    return text, [[offsets[t][0], offsets[t][1], float(weight)] for t in positions]
