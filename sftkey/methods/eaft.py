"""EAFT, Entropy-Adaptive Fine-Tuning (arXiv 2601.02151): each token's cross-entropy weighted by
the detached entropy of the softmax over its top-``k`` logits, scaled and raised to ``alpha``:

    l_i = stopgrad((H_k,i / scale)^alpha) * ce_i,   H_k,i = -sum_{j in top-k} p_j log(p_j + eps)

(``p`` the softmax of the ``k`` largest logits alone), averaged over the labelled tokens: the
weights are not in the mean's denominator, like DFT's ``p_y``.

The published implementations differ in the entropy's scale and in ``eps``; each is a preset of
:data:`EAFT_SETTINGS`:

* ``"llamafactory"``: the authors' code (PRIS-CV/EAFT points to ymxyll/LlamaFactory-EAFT, merged
  into LLaMA-Factory as ``use_eaft_loss`` / ``eaft_alpha``; ms-swift-EAFT's ``enable_eaft_loss``
  is the same formula): ``k = 20``, ``H / 3.0`` (3.0 standing for ``ln 20 = 2.996``), exact
  ``log p``;
* ``"axolotl"``: Axolotl's ``use_eaft`` / ``eaft_alpha`` / ``eaft_k``: ``k = eaft_k`` (20),
  the raw entropy, ``log(p + 1e-10)``.

Both divide by the number of labelled tokens (``num_items_in_batch`` under a Trainer), and both
default to ``alpha = 1``. Both materialize the ``N x V`` logits (in float32). Here the top-k
comes from :func:`sftkey.logit_stats` (``k <= 32``):

* :func:`eaft_weights` and the preset :func:`sftkey.methods.eaft` work on its statistics (the
  recompute path: ``8NDV`` FLOPs with the backward);
* :func:`eaft_loss` runs ``logit_stats(topk=k)`` under ``no_grad`` (``2NDV`` FLOPs, no saved
  graph), then :func:`sftkey.linear_cross_entropy`'s single pass with the weights as
  ``token_weights`` and the mean's denominator as ``normalizer`` (``6NDV``): ``8NDV`` in all,
  a third more than the cross-entropy alone, and every option of ``linear_cross_entropy``
  (``token_weights``, ``dft``, an ``anchor``, ...) still applies.
  ``use_fused_loss(model, eaft=...)`` and the trainers' ``loss_options=dict(eaft=...)`` take it.

The top-k adds ``O(k)`` comparisons per logit to the forward tile (Triton) or a ``topk`` per
row block (torch): small beside the ``2D`` FLOPs a logit costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import linear_cross_entropy, logit_stats
from ..backends.engine import MAX_TOPK
from ..options import LossOptions
from ..results import LogitStats


@dataclass(frozen=True)
class EaftSettings:
    """One EAFT implementation: the top-``k``, the entropy's divisor ``scale``, the ``eps``
    inside its log, and the exponent ``alpha``."""

    k: int = 20
    scale: float = 1.0
    eps: float = 0.0
    alpha: float = 1.0

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_TOPK:
            raise ValueError(f"k: expected an int in [1, {MAX_TOPK}] (the top-k logit_stats returns), got {self.k!r}")
        _check_number("scale", self.scale, positive=True)
        _check_number("eps", self.eps)
        _check_number("alpha", self.alpha)


def _check_number(name: str, value, positive: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


EAFT_SETTINGS: dict[str, EaftSettings] = {
    "llamafactory": EaftSettings(k=20, scale=3.0),
    "axolotl": EaftSettings(k=20, scale=1.0, eps=1e-10),
}
"""The published implementations (module docstring); ``alpha`` 1 in both, as their defaults.
Another ``alpha`` or ``k``: ``dataclasses.replace(EAFT_SETTINGS["axolotl"], alpha=0.5)``."""


def eaft_settings(settings: Union[str, EaftSettings]) -> EaftSettings:
    """``settings`` as an :class:`EaftSettings`: a name of :data:`EAFT_SETTINGS`, or one."""
    if isinstance(settings, EaftSettings):
        return settings
    if isinstance(settings, str) and settings in EAFT_SETTINGS:
        return EAFT_SETTINGS[settings]
    raise ValueError(f"settings: expected one of {sorted(EAFT_SETTINGS)} or an EaftSettings, got {settings!r}")


def eaft_weights(st: LogitStats, settings: Union[str, EaftSettings] = "llamafactory") -> Tensor:
    """EAFT's weights ``(H_k / scale)^alpha``, shaped like the targets, detached, 0 on ignored
    tokens; ``st`` from ``logit_stats(..., topk=k)`` or more."""
    s = eaft_settings(settings)
    have = 0 if st.topk is None else st.topk.shape[-1]
    if have < s.k:
        raise ValueError(f"st: EAFT with k={s.k} needs the top-{s.k} logits, st has {have}; call "
                         f"logit_stats(..., topk={s.k}) (with a vocabulary of V < k tokens: replace(settings, k=V))")
    top = st.topk[..., :s.k].detach()
    logp = top - torch.logsumexp(top, dim=-1, keepdim=True)
    p = logp.exp()
    entropy = -(p * (logp if s.eps == 0 else torch.log(p + s.eps))).sum(-1)
    weights = (entropy / s.scale).pow(s.alpha)
    return torch.where(st.valid, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))


def eaft_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, settings: Union[str, EaftSettings] = "llamafactory",
              bias: Optional[Tensor] = None, **options):
    """EAFT on :func:`sftkey.linear_cross_entropy`: ``logit_stats(topk=k)`` under ``no_grad``
    for the weights, then the fused loss with ``token_weights`` times them and, for ``"mean"``,
    the denominator ``sum_i a_i w_{y_i}`` of the caller's weights (the labelled count without
    them), unless ``normalizer`` is given. Shapes and ``options`` as ``linear_cross_entropy``'s
    (:class:`~sftkey.options.LossOptions`)."""
    opts = LossOptions.build(None, options, "eaft_loss")
    s = eaft_settings(settings)
    s = replace(s, k=min(s.k, weight.shape[0]))  # a vocabulary smaller than k: all of it (Axolotl's min(k, V))
    x, y = (hidden[..., :-1, :], targets[..., 1:]) if opts.shift else (hidden, targets)
    with torch.no_grad():
        st = logit_stats(x.detach(), weight.detach(), y, bias=None if bias is None else bias.detach(), topk=s.k,
                         softcap=opts.softcap, ignore_index=opts.ignore_index, backend=opts.backend)
    w = eaft_weights(st, s)
    if opts.shift:
        w = F.pad(w, (1, 0))  # weights are indexed like the targets and shift with them
    a = opts.token_weights
    normalizer = opts.normalizer
    if opts.reduction == "mean" and normalizer is None:
        from ..distributed import weight_total

        total = weight_total(targets, token_weights=a, class_weights=opts.class_weights,
                             ignore_index=opts.ignore_index, shift=opts.shift)
        normalizer = torch.where(total > 0, total, torch.ones_like(total))
    weights = w if a is None else a * w.to(a.dtype)
    return linear_cross_entropy(hidden, weight, targets, bias=bias,
                                options=replace(opts, token_weights=weights, normalizer=normalizer))
