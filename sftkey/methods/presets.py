"""Token-loss presets on :func:`sftkey.logit_stats`: SFT, SFTKey, CFT, DFT, SED-SFT, entropy, focal.

Each preset maps the statistics ``st`` of one batch to per-token losses shaped like the
targets, 0 on ignored tokens; :func:`reduce` turns them into the scalar to train on. The
backward through ``logit_stats`` is fused, so every preset trains without ``N x V`` logits::

    st = sftkey.logit_stats(hidden[:, :-1], lm_head.weight, labels[:, 1:], topk=2)
    loss = methods.reduce(methods.sed_sft(st), st)

With ``p_y = exp(st.target_logprob)`` and ``ce = -log p_y`` on non-ignored tokens:

* ``sft``: ``ce`` (plain SFT);
* ``sftkey``: ``a * ce``, ``a`` the :mod:`sftkey.methods.keys` token weights (SFTKey stage 1 or 2);
* ``cft``: ``m * ce``, ``m`` in {0, 1} marking critical tokens (critical-token fine-tuning);
* ``dft``: ``stopgrad(p_y) * ce`` (Dynamic Fine-Tuning, TRL's ``loss_type="dft"``);
* ``sed_sft``: ``ce + lam * M * (p_y - 1/2)^2``, ``M = [top-k mass < threshold]`` (SED-SFT;
  :func:`calibrate_sed_threshold` and :data:`SED_SFT_SETTINGS` give the threshold, :mod:`sftkey.methods.sed`);
* ``entropy_bonus``: ``-beta * e * H`` (entropy regularization);
* ``focal``: ``-(1 - p_y)^gamma * log p_y`` (focal loss).

Presets add up: ``methods.sft(st) + methods.entropy_bonus(st, 0.01)``.

Two recipes need a second head (a frozen reference or a teacher), so they take the hidden
states and heads themselves, not statistics (docs/methods.md):

* ``asft``: Anchored SFT, ``stopgrad(p_y) * ce + kl_weight * KL(p_ref || p_theta)``, one pass
  over the policy logits (:func:`sftkey.linear_cross_entropy` with ``dft`` and an ``anchor``);
* ``distill``: ``T^2 * D(teacher, student)`` at temperature ``T`` (:func:`sftkey.linear_divergence`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..api import linear_cross_entropy, linear_divergence
from ..results import LogitStats
from ..core.loss import nonzero
from ..core.loss import reduce as reduce_losses
from .sed import SED_SFT_SETTINGS, SedSettings, calibrate_sed_threshold, top_mass

__all__ = ["sft", "sftkey", "cft", "dft", "sed_sft", "entropy_bonus", "focal", "reduce", "asft", "distill",
           "calibrate_sed_threshold", "top_mass", "SED_SFT_SETTINGS", "SedSettings", "ASFT_KL_WEIGHT"]

#: ASFT's ``kl_weight`` default in the authors' train.py (their README's example uses 0.05).
ASFT_KL_WEIGHT = 0.1


def _valid_only(st: LogitStats, loss: Tensor) -> Tensor:
    """``loss`` with ignored tokens set to 0 (``where``, so their gradient is 0 too)."""
    return torch.where(st.valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def _weights(st: LogitStats, weights: Union[Tensor, float], name: str) -> Tensor:
    """``weights`` as a float tensor broadcastable to the targets' shape."""
    w = torch.as_tensor(weights, device=st.lse.device)
    if w.dim() and w.shape != st.lse.shape:
        raise ValueError(f"{name}: expected a scalar or shape {tuple(st.lse.shape)} like the targets, "
                         f"got {tuple(w.shape)}")
    return w.to(st.lse.dtype)


def sft(st: LogitStats) -> Tensor:
    """Cross-entropy ``-log p_y`` per token (plain SFT)."""
    return -st.target_logprob


def sftkey(st: LogitStats, token_weights: Tensor) -> Tensor:
    """SFTKey: ``a * ce`` with ``token_weights`` ``a`` from :func:`sftkey.methods.keys.encode_example`
    (stage 1: 1 on every response token; stage 2: 1 on key tokens, 0 elsewhere; or a blend)."""
    return sft(st) * _weights(st, token_weights, "token_weights")


def cft(st: LogitStats, critical_mask: Tensor) -> Tensor:
    """Critical-token fine-tuning: ``ce`` on the tokens where ``critical_mask`` (bool or 0/1)
    is set, 0 elsewhere."""
    return sft(st) * _weights(st, critical_mask, "critical_mask")


def dft(st: LogitStats) -> Tensor:
    """Dynamic Fine-Tuning: ``stopgrad(p_y) * ce`` (TRL's ``loss_type="dft"``)."""
    logp = st.target_logprob
    return -logp * logp.detach().exp()


def sed_sft(st: LogitStats, lam: float = 0.2, threshold: float = 0.95,
            mask: Optional[Tensor] = None, k: int = 2) -> Tensor:
    """SED-SFT: ``ce + lam * M * (p_y - 1/2)^2``, where ``M`` marks the tokens whose top-``k``
    probability mass is below ``threshold`` (the model is unsure there, so the term keeps
    ``p_y`` from collapsing to 1). Needs ``st`` from ``logit_stats(..., topk=k)`` or more.
    ``mask`` (optional, bool or 0/1) further restricts ``M``. Defaults are the authors' loss
    class's; their trainer's, with a calibrated ``threshold``: :data:`SED_SFT_SETTINGS`."""
    selected = (top_mass(st, k) < threshold) & st.valid
    if mask is not None:
        selected = selected & _weights(st, mask, "mask").bool()
    p = st.target_logprob.exp()
    return sft(st) + lam * selected.to(p.dtype) * (p - 0.5).square()


def entropy_bonus(st: LogitStats, beta: float, weights: Union[Tensor, float] = 1.0) -> Tensor:
    """``-beta * e * H``: rewards entropy ``H`` (``beta > 0``) on non-ignored tokens, with
    optional per-token ``weights`` ``e``."""
    return _valid_only(st, -beta * _weights(st, weights, "weights") * st.entropy)


def focal(st: LogitStats, gamma: float = 2.0) -> Tensor:
    """Focal loss ``-(1 - p_y)^gamma * log p_y`` (``gamma = 0`` is ``ce``)."""
    logp = st.target_logprob
    return -(1 - logp.exp()).pow(gamma) * logp


def reduce(losses: Tensor, st: LogitStats, *, weights: Optional[Tensor] = None,
           reduction: str = "mean", normalizer: Union[Tensor, float, None] = None) -> Tensor:
    """Reduce per-token ``losses`` like :func:`sftkey.linear_cross_entropy`: ``"sum"``, or
    ``"mean"`` = sum over tokens / ``sum(weights)`` over non-ignored tokens (their count when
    ``weights`` is None), or / ``normalizer`` when given (e.g. ``num_items_in_batch``). A batch
    with nothing to divide by gives 0, never NaN; ``"none"`` returns ``losses`` unchanged."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    denom = None
    if reduction == "mean":
        if normalizer is None:
            per_token = st.valid.to(losses.dtype)
            if weights is not None:
                per_token = per_token * _weights(st, weights, "weights")
            normalizer = per_token.sum()
        denom = nonzero(torch.as_tensor(normalizer, dtype=losses.dtype, device=losses.device))
    return reduce_losses(losses, reduction, denom)


def asft(hidden: Tensor, weight: Tensor, targets: Tensor, ref_hidden: Tensor, ref_weight: Tensor, *,
         kl_weight: float = ASFT_KL_WEIGHT, bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
         **options) -> Tensor:
    """Anchored SFT (arXiv 2509.23753): per token ``stopgrad(p_y) * ce + kl_weight * KL(q || p)``,
    ``p`` the policy's distribution, ``q`` the frozen reference's (``ref_hidden [..., D_ref]``,
    ``ref_weight [V, D_ref]``), averaged over the non-ignored tokens; one pass over both heads.
    ``options``: further :class:`~sftkey.options.LossOptions` (``shift``, ``token_weights``,
    ``reduction``, ...; token weights weight both terms)."""
    anchor = (ref_hidden, ref_weight) if ref_bias is None else (ref_hidden, ref_weight, ref_bias)
    return linear_cross_entropy(hidden, weight, targets, bias=bias, dft=True, anchor=anchor,
                                anchor_weight=kl_weight, anchor_kind="forward_kl", **options)


def distill(hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
            targets: Optional[Tensor] = None, *, kind: str = "forward_kl", temperature: float = 1.0,
            beta: float = 0.5, bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
            **options) -> Tensor:
    """Knowledge distillation: ``T^2 * D`` with ``D`` the ``kind`` divergence between the
    student's (``hidden``, ``weight``) and the teacher's tempered distributions (forward KL
    ``KL(teacher || student)`` by default, as in Hinton et al.; "jsd" with ``beta``, as
    Liger's fused linear JSD), ``T = temperature``. The ``T^2`` keeps the gradients' scale
    independent of ``T`` (Hinton et al., 2015). ``options``:
    :class:`~sftkey.options.DivergenceOptions` (``token_weights``, ``shift``, ``reduction``,
    ...); ``targets`` only mark the tokens (``ignore_index``). Add a cross-entropy term for
    the hard labels with :func:`sftkey.linear_cross_entropy` (or, at ``T = 1``, in the same
    pass with its ``anchor``)."""
    loss = linear_divergence(hidden, weight, teacher_hidden, teacher_weight, targets, bias=bias,
                             ref_bias=teacher_bias, kind=kind, temperature=temperature, beta=beta, **options)
    return loss * temperature ** 2
