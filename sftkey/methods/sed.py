"""SED-SFT's gate and its threshold (Selectively Encouraging Diversity, arXiv 2602.07464).

The per-token term is ``lam * [top-k mass < tau] * (p_y - 1/2)^2`` (:func:`sftkey.methods.sed_sft`).
The authors' code (github pppa2019/SED-SFT) has two sets of defaults:

* the loss class (``utils/sed_triton_loss.py``, ``SEDLoss``): ``lam = 0.2``, ``k = 2``,
  ``tau = 0.95`` fixed;
* the trainer (``train.py`` with ``loss="sed_with_topk_cumsum_ratio"``): ``lam`` from
  ``entropy_penalty_scale`` (default 1.0), the loss's ``k = 2``, and ``tau`` *calibrated*
  before training with the initial model on the first 100 validation samples:
  ``tau = sorted(masses)[-int(cumsum_ratio * n)]`` over the top-k mass of every position of
  those sequences (prompt included), ``cumsum_ratio`` 0.3 by default and 0.7 in the paper's
  script. So a ``cumsum_ratio`` share of the tokens has mass ``>= tau`` and about
  ``1 - cumsum_ratio`` gets the term: ``tau`` is the ``1 - cumsum_ratio`` quantile.

The trainer calibrates with ``k = 10`` (its ``top_k`` when unset) but gates the loss with
``k = 2``: the threshold is a quantile of one quantity, applied to another, so the share of
gated tokens is not the one ``cumsum_ratio`` states (top-10 mass >= top-2 mass, so more
tokens fall below ``tau``). Here the calibration ``k`` is a parameter; the recommended
setting, ``SED_SFT_SETTINGS["consistent"]``, calibrates with the loss's ``k = 2``; the
trainer's ``k = 10`` is kept as ``"trainer"`` / ``"paper_script"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..api import logit_stats
from .keys import IGNORE_INDEX
from ..results import LogitStats


@dataclass(frozen=True)
class SedSettings:
    """One set of SED-SFT hyper-parameters: ``lam``, the gate's ``k``, a fixed ``threshold``
    or (``threshold=None``) a ``quantile`` of the top-``calibration_k`` mass over the first
    ``num_samples`` validation samples, on ``tokens`` (``"all"`` positions, or ``"labels"``)."""

    lam: float
    k: int
    threshold: Optional[float] = None
    quantile: Optional[float] = None
    calibration_k: Optional[int] = None
    num_samples: int = 100
    tokens: str = "all"


SED_SFT_SETTINGS: dict[str, SedSettings] = {
    "loss_class": SedSettings(lam=0.2, k=2, threshold=0.95),
    "trainer": SedSettings(lam=1.0, k=2, quantile=0.7, calibration_k=10),       # cumsum_ratio = 0.3
    "paper_script": SedSettings(lam=1.0, k=2, quantile=0.3, calibration_k=10),  # cumsum_ratio = 0.7
    "consistent": SedSettings(lam=1.0, k=2, quantile=0.3, calibration_k=2, tokens="labels"),
}
"""The authors' defaults (module docstring) and the recommended ``"consistent"`` set: the
paper script's quantile, calibrated with the loss's own ``k`` on the trained tokens."""


def top_mass(st: LogitStats, k: int) -> Tensor:
    """Probability mass of the ``k`` most probable tokens, shaped like the targets, float64,
    at most 1 (float32 statistics can round above); no gradient. Needs ``st`` from
    ``logit_stats(..., topk=k)`` or more."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if st.topk is None or st.topk.shape[-1] < k:
        raise ValueError(f"k={k}: needs the top-{k} logits; call logit_stats(..., topk={k}) or more")
    return (st.topk[..., :k].double() - st.lse.detach().double().unsqueeze(-1)).exp().sum(-1).clamp(max=1.0)


def _rows(item: Mapping[str, Any], name: str) -> Optional[Tensor]:
    value = item.get(name)
    return None if value is None else torch.as_tensor(value, dtype=torch.long).reshape(-1)


def _batch(items: Sequence[Mapping[str, Any]], tokens: str, device) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids``, ``attention_mask`` (padded on the right) and the targets of ``items``:
    their ``labels`` shifted, or (``tokens="all"``) every next token."""
    rows = []
    for item in items:
        ids = _rows(item, "input_ids")
        if ids is None:
            raise ValueError("data: expected mappings with 'input_ids' (and 'labels' for tokens='labels')")
        mask = _rows(item, "attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX) if tokens == "all" else _rows(item, "labels")
        if labels is None:
            raise ValueError("data: tokens='labels' needs a 'labels' entry in every item")
        rows.append((ids, mask, labels))
    width = max(len(r[0]) for r in rows)
    out = [torch.full((len(rows), width), fill, dtype=torch.long) for fill in (0, 0, IGNORE_INDEX)]
    for i, row in enumerate(rows):
        for t, r in zip(out, row):
            t[i, :len(r)] = r
    ids, mask, labels = (t.to(device) for t in out)
    return ids, mask, labels[:, 1:]


def _model_stats(model: nn.Module, data: Iterable[Mapping[str, Any]], k: int, num_samples: int, tokens: str,
                 batch_size: int, backend: str) -> Iterable[LogitStats]:
    """``logit_stats(..., topk=k)`` of the model's head on its backbone's final hidden states."""
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"model: its config sets {attr}; pass the LogitStats of its logits instead")
    head, body = model.get_output_embeddings(), model.base_model
    device = head.weight.device
    items = []
    for item in data:
        if len(items) == num_samples:
            break
        items.append(item)
    for start in range(0, len(items), batch_size):
        ids, mask, targets = _batch(items[start:start + batch_size], tokens, device)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        yield logit_stats(hidden[:, :-1], head.weight, targets, bias=getattr(head, "bias", None), topk=k,
                          backend=backend)


def _quantile(values: Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation), for any number of values."""
    s = values.sort().values
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


@torch.no_grad()
def calibrate_sed_threshold(
    source: Union[nn.Module, Iterable[LogitStats]],
    quantile: float = 0.3,
    k: int = 2,
    *,
    data: Optional[Iterable[Mapping[str, Any]]] = None,
    num_samples: int = 100,
    tokens: str = "labels",
    batch_size: int = 8,
    backend: str = "auto",
) -> float:
    """SED-SFT's threshold ``tau``: the ``quantile`` (linear interpolation, as
    ``torch.quantile``) of the top-``k`` probability mass over the tokens, so about a
    ``quantile`` share of them gets the SED term. Compute it with the initial model.

    ``source``: a Hugging Face causal LM, with ``data`` (mappings with ``input_ids``, and
    ``labels`` / ``attention_mask``: lists or 1-D tensors; the first ``num_samples`` are
    used, ``batch_size`` at a time, through ``logit_stats``, so no logits are built), or an
    iterable of :class:`sftkey.LogitStats` with ``topk >= k`` (their non-ignored tokens count).
    ``tokens``: ``"labels"``, the tokens the loss trains (the labelled next tokens), or
    ``"all"``, every position but the last, as the authors' trainer does. The authors' own
    ``cumsum_ratio`` is ``1 - quantile``. Defaults: the ``"consistent"`` set of
    :data:`SED_SFT_SETTINGS`.
    """
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 <= quantile <= 1:
        raise ValueError(f"quantile: expected a number in [0, 1], got {quantile!r}")
    if tokens not in ("labels", "all"):
        raise ValueError(f"tokens: expected 'labels' or 'all', got {tokens!r}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(source, nn.Module):
        if data is None:
            raise ValueError("data: a model needs the validation data to calibrate on")
        source = _model_stats(source, data, k, num_samples, tokens, batch_size, backend)
    elif data is not None:
        raise ValueError("data: only with a model; LogitStats carry their own tokens")
    masses = []
    for st in source:
        if not isinstance(st, LogitStats):
            raise TypeError(f"source: expected a model or LogitStats, got an iterable of {type(st).__name__}")
        masses.append(top_mass(st, k)[st.valid].reshape(-1))
    values = torch.cat(masses) if masses else torch.empty(0)
    if not len(values):
        raise ValueError("source: no token to calibrate on (every target ignored, or no data)")
    return _quantile(values.cpu(), float(quantile))
