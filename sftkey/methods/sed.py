"""SED-SFT's gate and its threshold (Selectively Encouraging Diversity, arXiv 2602.07464).

The per-token term is ``lam * [top-k mass < tau] * (p_y - 1/2)^2`` (:func:`sftkey.methods.sed_sft`).
The authors' code (github pppa2019/SED-SFT, ``train.py`` and ``sft_trainer_v2.py``) has two
SED runs, ``--loss sed_triton`` and ``--loss sed_with_topk_cumsum_ratio``, both through
``SEDLoss`` (``utils/sed_triton_loss.py``, whose gate applies whatever its flags say), with
``lam = entropy_penalty_scale`` (default 1.0) and the mean over the labelled tokens:

* ``sed_triton``: ``sed_loss_triton``'s own defaults, ``k = 10`` and ``tau = 0.95`` fixed;
* ``sed_with_topk_cumsum_ratio``: the gate's ``k = top_k or 2`` and ``tau`` *calibrated*
  before training with the initial model on the first 100 validation samples:
  ``tau = sorted(masses)[-int(cumsum_ratio * n)]`` over the top-``(top_k or 10)`` mass of every
  position of those sequences (prompt included); ``cumsum_ratio`` 0.3 by default, 0.7 in the
  paper's script (``train_scripts/train_cumsum_numina.sh``). So a ``cumsum_ratio`` share of
  the tokens has mass ``>= tau`` and about ``1 - cumsum_ratio`` gets the term: ``tau`` is the
  ``1 - cumsum_ratio`` quantile.

(``SEDLoss``'s class defaults, ``lam = 0.2``, ``k = 2``, ``tau = 0.95``, are no run's: the
trainer passes its own.) The calibrated run measures the top-10 mass but gates the top-2 mass:
the threshold is a quantile of one quantity applied to another, so the share of gated tokens
is not the one ``cumsum_ratio`` states (top-10 mass >= top-2 mass, so more tokens fall below
``tau``). :data:`SED_SFT_SETTINGS` has each run, and this package's ``"consistent"`` setting,
which calibrates with the gate's own ``k`` on the trained tokens. :func:`calibrate_sed_threshold`
has no defaults for these choices: the caller states them (a result calibrated with
``"consistent"`` is not the authors' run).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..api import logit_stats
from ..backends.engine import MAX_TOPK
from ..integrations.transformers import LOGIT_POSTPROCESSING, hidden_at_head
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
    "sed_triton": SedSettings(lam=1.0, k=10, threshold=0.95),                   # --loss sed_triton
    "trainer": SedSettings(lam=1.0, k=2, quantile=0.7, calibration_k=10),       # cumsum_ratio = 0.3
    "paper_script": SedSettings(lam=1.0, k=2, quantile=0.3, calibration_k=10),  # cumsum_ratio = 0.7
    "consistent": SedSettings(lam=1.0, k=2, quantile=0.3, calibration_k=2, tokens="labels"),
}
"""The authors' runs (module docstring): ``"sed_triton"``; ``"trainer"``, their
``sed_with_topk_cumsum_ratio`` run with ``train.py``'s defaults; ``"paper_script"``, the same
run with the paper script's ``cumsum_ratio = 0.7``. And this package's ``"consistent"``
setting (not the authors'): the paper script's quantile, calibrated with the gate's own ``k``
on the trained tokens."""


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


def _head_of(model: nn.Module) -> nn.Module:
    """The LM head of ``model`` (a Hugging Face causal LM, or a PEFT model around one), refused
    where the logits are not its plain output."""
    get_base_model = getattr(model, "get_base_model", None)
    causal = get_base_model() if callable(get_base_model) else model
    config = getattr(causal, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in LOGIT_POSTPROCESSING:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"source: the model's config sets {attr}; pass the LogitStats of its logits instead")
    head = causal.get_output_embeddings()
    if head is None or hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise ValueError("source: the model's LM head is missing or wrapped by an adapter; pass the LogitStats of "
                         "its logits instead")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"source: the model's LM head ({type(head).__name__}) has no [vocab, hidden] weight")
    return head


def _model_stats(model: nn.Module, data: Iterable[Mapping[str, Any]], k: int, num_samples: int, tokens: str,
                 batch_size: int, backend: str) -> Iterable[LogitStats]:
    """``logit_stats(..., topk=k)`` of the model's LM head on the hidden states it receives (the
    model runs until it calls its head: no logits)."""
    head = _head_of(model)
    device = head.weight.device
    items = []
    for item in data:
        if len(items) == num_samples:
            break
        items.append(item)
    for start in range(0, len(items), batch_size):
        ids, mask, targets = _batch(items[start:start + batch_size], tokens, device)
        hidden = hidden_at_head(head, lambda: model(input_ids=ids, attention_mask=mask))
        if hidden is None:
            raise ValueError(f"source: {type(model).__name__}'s forward did not call its LM head")
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
    quantile: float,
    k: int,
    *,
    data: Optional[Iterable[Mapping[str, Any]]] = None,
    tokens: Optional[str] = None,
    num_samples: int = 100,
    batch_size: int = 8,
    backend: str = "auto",
) -> float:
    """SED-SFT's threshold ``tau``: the ``quantile`` (linear interpolation, as
    ``torch.quantile``) of the top-``k`` probability mass over the tokens, so about a
    ``quantile`` share of them gets the SED term. Compute it with the initial model.

    ``source``: a Hugging Face causal LM (or a PEFT model around one), with ``data`` (mappings
    with ``input_ids``, and ``labels`` / ``attention_mask``: lists or 1-D tensors; the first
    ``num_samples`` are used, ``batch_size`` at a time; the model runs up to its LM head and
    ``logit_stats`` takes the head's input, so no logits are built), or an iterable of
    :class:`sftkey.LogitStats` with ``topk >= k`` (their non-ignored tokens count).
    ``tokens`` (with a model): ``"labels"``, the tokens the loss trains (the labelled next
    tokens), or ``"all"``, every position but the last, as the authors' trainer does. The
    authors' ``cumsum_ratio`` is ``1 - quantile``. No defaults for ``quantile``, ``k`` and
    ``tokens``: take them from a setting of :data:`SED_SFT_SETTINGS`.
    """
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 <= quantile <= 1:
        raise ValueError(f"quantile: expected a number in [0, 1], got {quantile!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOPK:
        raise ValueError(f"k: expected an int in [1, {MAX_TOPK}] (logit_stats returns at most {MAX_TOPK} top "
                         f"logits), got {k!r}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(source, nn.Module):
        if data is None:
            raise ValueError("data: a model needs the validation data to calibrate on")
        if tokens not in ("labels", "all"):
            raise ValueError(f"tokens: expected 'labels' or 'all' with a model, got {tokens!r}")
        source = _model_stats(source, data, k, num_samples, tokens, batch_size, backend)
    elif data is not None or tokens is not None:
        raise ValueError("data, tokens: only with a model; LogitStats carry their own tokens")
    masses = []
    for st in source:
        if not isinstance(st, LogitStats):
            raise TypeError(f"source: expected a model or LogitStats, got an iterable of {type(st).__name__}")
        masses.append(top_mass(st, k)[st.valid].reshape(-1))
    values = torch.cat(masses) if masses else torch.empty(0)
    if not len(values):
        raise ValueError("source: no token to calibrate on (every target ignored, or no data)")
    return _quantile(values.cpu(), float(quantile))
