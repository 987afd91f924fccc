"""Token-loss presets on :func:`sftkey.logit_stats`: SFT, CFT and SFTKey (through token weights),
DFT, SED-SFT, EAFT, entropy, focal.

Each preset maps the statistics ``st`` of one batch to per-token losses shaped like the
targets, 0 on ignored tokens; :func:`reduce` turns them into the scalar to train on, with
:func:`sftkey.linear_cross_entropy`'s normalization. The backward through ``logit_stats`` is
fused, so every preset trains without ``N x V`` logits::

    st = sftkey.logit_stats(hidden[:, :-1], lm_head.weight, labels[:, 1:], topk=10)
    loss = methods.reduce(methods.sed_sft(st), st)
    loss = methods.reduce(methods.sft(st), st, token_weights=a)   # SFTKey's or CFT's weights

With ``p_y = exp(st.target_logprob)`` and ``ce = -log p_y`` on non-ignored tokens:

* ``sft``: ``ce`` (plain SFT); SFTKey (``a`` from :mod:`sftkey.methods.keys`) and CFT (``a``
  the critical-token mask) are ``sft`` reduced with ``token_weights=a``;
* ``dft``: ``stopgrad(p_y) * ce`` (Dynamic Fine-Tuning, TRL's ``loss_type="dft"``);
* ``sed_sft``: ``ce + lam * M * (p_y - 1/2)^2``, ``M = [top-k mass < threshold]`` (SED-SFT;
  :data:`SED_SFT_SETTINGS` and :func:`calibrate_sed_threshold`, :mod:`sftkey.methods.sed`);
* ``eaft``: ``stopgrad((H_k / scale)^alpha) * ce``, ``H_k`` the entropy of the top-k softmax
  (EAFT; :data:`EAFT_SETTINGS`, :mod:`sftkey.methods.eaft`);
* ``entropy_bonus``: ``-beta * e * H`` (entropy regularization);
* ``focal``: ``-(1 - p_y)^gamma * log p_y`` (focal loss).

Presets add up: ``methods.sft(st) + methods.entropy_bonus(st, 0.01)``.

Three recipes take the hidden states and heads themselves, not statistics (docs/methods.md):

* ``asft``: Anchored SFT, ``stopgrad(p_y) * ce + anchor_weight * KL(p_ref || p_theta)``, one
  pass over the policy logits (:func:`sftkey.linear_cross_entropy` with ``dft`` and an ``anchor``);
* ``distill``: ``T^2 * D(teacher, student)`` at temperature ``T`` (:func:`sftkey.linear_divergence`);
* ``eaft_loss``: EAFT through :func:`sftkey.linear_cross_entropy`'s options (:mod:`sftkey.methods.eaft`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..api import linear_cross_entropy, linear_divergence
from ..results import LogitStats
from ..core.loss import nonzero
from ..core.inputs import check_token_weights
from ..core.loss import reduce as reduce_losses
from .eaft import EAFT_SETTINGS, EaftSettings, eaft_loss, eaft_weights
from .sed import SED_SFT_SETTINGS, SedSettings, calibrate_sed_threshold, top_mass

__all__ = ["sft", "dft", "sed_sft", "eaft", "entropy_bonus", "focal", "reduce", "asft", "distill", "eaft_loss",
           "eaft_weights", "EAFT_SETTINGS", "EaftSettings", "calibrate_sed_threshold", "top_mass",
           "SED_SFT_SETTINGS", "SedSettings", "ASFT_ANCHOR_WEIGHT"]

#: ASFT's ``kl_weight`` default in the authors' train.py (their README's example uses 0.05):
#: :func:`asft`'s ``anchor_weight``.
ASFT_ANCHOR_WEIGHT = 0.1


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


def dft(st: LogitStats) -> Tensor:
    """Dynamic Fine-Tuning: ``stopgrad(p_y) * ce`` (TRL's ``loss_type="dft"``)."""
    logp = st.target_logprob
    return -logp * logp.detach().exp()


def sed_sft(st: LogitStats, lam: float = 1.0, threshold: float = 0.95,
            mask: Optional[Tensor] = None, k: int = 10) -> Tensor:
    """SED-SFT: ``ce + lam * M * (p_y - 1/2)^2``, where ``M`` marks the tokens whose top-``k``
    probability mass is below ``threshold`` (the model is unsure there, so the term keeps
    ``p_y`` from collapsing to 1). Needs ``st`` from ``logit_stats(..., topk=k)`` or more.
    ``mask`` (optional, bool or 0/1) further restricts ``M``. The defaults are the authors'
    ``sed_triton`` run; their other runs, with a calibrated ``threshold``: :data:`SED_SFT_SETTINGS`."""
    selected = (top_mass(st, k) < threshold) & st.valid
    if mask is not None:
        selected = selected & _weights(st, mask, "mask").bool()
    p = st.target_logprob.exp()
    return sft(st) + lam * selected.to(p.dtype) * (p - 0.5).square()


def eaft(st: LogitStats, settings: Union[str, EaftSettings] = "llamafactory") -> Tensor:
    """EAFT: ``stopgrad((H_k / scale)^alpha) * ce``, ``H_k`` the entropy of the softmax over the
    top-``k`` logits (:func:`sftkey.methods.eaft.eaft_weights`; ``settings`` a name of
    :data:`EAFT_SETTINGS` or an :class:`EaftSettings`). Needs ``st`` from ``logit_stats(...,
    topk=k)``. Reduced with :func:`reduce` (no token weights) it is the frameworks' loss."""
    return eaft_weights(st, settings) * sft(st)


def entropy_bonus(st: LogitStats, beta: float, weights: Union[Tensor, float] = 1.0) -> Tensor:
    """``-beta * e * H`` on non-ignored tokens, with optional per-token ``weights`` ``e``:
    ``beta * e > 0`` rewards entropy ``H`` (a bonus), ``< 0`` penalizes it (entropy
    minimization), as ``linear_cross_entropy``'s ``entropy_weights`` of the same sign."""
    return _valid_only(st, -beta * _weights(st, weights, "weights") * st.entropy)


def focal(st: LogitStats, gamma: float = 2.0) -> Tensor:
    """Focal loss ``-(1 - p_y)^gamma * log p_y`` (``gamma = 0`` is ``ce``)."""
    logp = st.target_logprob
    return -(1 - logp.exp()).pow(gamma) * logp


def reduce(losses: Tensor, st: LogitStats, *, token_weights: Optional[Tensor] = None,
           reduction: str = "mean", normalizer: Union[Tensor, float, None] = None) -> Tensor:
    """Reduce per-token ``losses`` as :func:`sftkey.linear_cross_entropy` reduces its own:
    with ``token_weights`` ``a`` (shaped like the targets, >= 0; SFTKey's or CFT's), each
    token's loss is ``a_i l_i``; ``"sum"`` adds them, ``"mean"`` divides that sum by ``sum_i
    a_i`` over the non-ignored tokens (their count without ``a``), or by ``normalizer`` when
    given (e.g. ``num_items_in_batch``); ``"none"`` returns ``a_i l_i``. So
    ``reduce(sft(st), st, token_weights=a)`` is ``linear_cross_entropy(..., token_weights=a)``.
    (``a`` weights every term of ``losses``; ``linear_cross_entropy`` does not weight its
    entropy and z-loss terms by ``a``.) A batch with nothing to divide by gives 0, never NaN."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    per_token = st.valid.to(losses.dtype)
    if token_weights is not None:
        if not isinstance(token_weights, Tensor) or token_weights.shape != st.lse.shape:
            raise ValueError(f"token_weights: expected a tensor of shape {tuple(st.lse.shape)} like the targets, "
                             f"got {getattr(token_weights, 'shape', type(token_weights).__name__)}")
        check_token_weights(token_weights)
        a = token_weights.to(device=losses.device, dtype=losses.dtype)
        losses = losses * a
        per_token = per_token * a
    denom = None
    if reduction == "mean":
        denom = nonzero(per_token.sum() if normalizer is None
                        else torch.as_tensor(normalizer, dtype=losses.dtype, device=losses.device))
    return reduce_losses(losses, reduction, denom)


def asft(hidden: Tensor, weight: Tensor, targets: Tensor, ref_hidden: Tensor, ref_weight: Tensor, *,
         anchor_weight: float = ASFT_ANCHOR_WEIGHT, bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
         **options) -> Tensor:
    """Anchored SFT (arXiv 2509.23753): per token ``stopgrad(p_y) * ce + anchor_weight * KL(q ||
    p)``, ``p`` the policy's distribution, ``q`` the frozen reference's (``ref_hidden [...,
    D_ref]``, ``ref_weight [V, D_ref]``), averaged over the non-ignored tokens; one pass over
    both heads. ``anchor_weight`` is the authors' ``kl_weight``, 0.1 in their train.py.
    ``options``: further :class:`~sftkey.options.LossOptions` (``shift``, ``token_weights``,
    ``reduction``, ...; token weights weight both terms)."""
    anchor = (ref_hidden, ref_weight) if ref_bias is None else (ref_hidden, ref_weight, ref_bias)
    return linear_cross_entropy(hidden, weight, targets, bias=bias, dft=True, anchor=anchor,
                                anchor_weight=anchor_weight, anchor_kind="forward_kl", **options)


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
