"""The oracle: the contract written directly in PyTorch, materializing the ``N x V`` logits in
float32 (float64 for float64 inputs). It shares nothing with the code it checks but the
result types: its own shift, flattening, weighting and reduction, ``torch.log_softmax`` for
the probabilities. Same signatures as :func:`sftkey.linear_cross_entropy`,
:func:`sftkey.logit_stats` and :func:`sftkey.linear_divergence`; memory is ``O(N V)``, so use it on small shapes. It does not
validate its arguments (the public functions do, before they call it)."""
from __future__ import annotations

import torch
from torch import Tensor

from .results import LogitStats, LossStats


def _shifted(t: Tensor, fill) -> Tensor:
    return torch.cat([t[..., 1:], torch.full_like(t[..., :1], fill)], dim=-1)


def _logits(hidden, weight, bias, softcap):
    """``[N, V]`` logits in the accumulation dtype, cast first as ``F.linear`` would under autocast."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype != torch.float64:
        cast = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type, enabled=False):
        z = hidden.reshape(-1, hidden.shape[-1]).to(acc) @ weight.to(acc).t()
        if bias is not None:
            z = z + bias.to(acc)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
    return z


def linear_cross_entropy(hidden, weight, targets, *, bias=None, token_weights=None, entropy_weights=None,
                         class_weights=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                         dft=False, reduction="mean", normalizer=None, shift=False, return_stats=False,
                         anchor=None, anchor_weight=None, anchor_kind="forward_kl", anchor_beta=0.5,
                         backend="reference", filter_eps=None):
    """Materializing :func:`sftkey.linear_cross_entropy` (``backend`` and ``filter_eps`` are ignored)."""
    z_anchor = None
    if anchor is not None:
        if anchor_weight is None:
            raise ValueError("anchor_weight is required with an anchor")
        z_anchor = _logits(anchor[0].detach(), anchor[1].detach(), None if len(anchor) < 3 else anchor[2].detach(),
                           None)
    if shift:
        targets = _shifted(targets, ignore_index)
        token_weights = None if token_weights is None else _shifted(token_weights, 0)
        if isinstance(entropy_weights, Tensor) and entropy_weights.dim():
            entropy_weights = _shifted(entropy_weights, 0)
    shape = targets.shape
    z = _logits(hidden, weight, bias, softcap)
    dtype = z.dtype

    def per_token(t):
        return t if not isinstance(t, Tensor) or t.dim() == 0 else t.reshape(-1).to(dtype)

    y = targets.reshape(-1)
    valid = y != ignore_index
    yc = torch.where(valid, y, 0).long()
    V = z.shape[-1]
    w = torch.ones(V, dtype=dtype, device=z.device) if class_weights is None else class_weights.to(dtype)
    a = torch.ones_like(z[:, 0]) if token_weights is None else per_token(token_weights)
    logp = torch.log_softmax(z, dim=-1)
    prob = logp.exp()
    logp_y = logp.gather(1, yc[:, None]).squeeze(1)
    ce = (1 - label_smoothing) * -logp_y * w[yc] + label_smoothing * -(logp * w).sum(-1) / V
    ce = ce * a
    if dft:
        ce = ce * logp_y.exp().detach()
    lse = torch.logsumexp(z, dim=-1)
    entropy = torch.special.entr(prob).sum(-1)
    loss = ce + z_loss * lse ** 2
    if z_anchor is not None:
        loss = loss + anchor_weight * a * _divergence(z, z_anchor, anchor_kind, anchor_beta)
    if entropy_weights is not None:
        loss = loss - per_token(entropy_weights) * entropy
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        out = loss.reshape(shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        if normalizer is None:
            denom = (a * w[yc] * valid).sum()
            denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        else:
            denom = torch.as_tensor(normalizer, dtype=dtype, device=z.device).reshape(())
        out = loss.sum() / denom
    if not return_stats:
        return out
    logp_y = torch.where(valid, logp_y, torch.zeros_like(logp_y)).detach()
    predicted = z.argmax(-1)
    correct = (predicted == y) & valid
    return out, LossStats(*(t.reshape(shape) for t in (lse.detach(), entropy.detach(), logp_y, correct, predicted)))


def logit_stats(hidden, weight, targets, *, bias=None, class_weights=None, softcap=None, ignore_index=-100,
                topk=0, backend="reference", filter_eps=None) -> LogitStats:
    """Materializing :func:`sftkey.logit_stats` (``backend`` and ``filter_eps`` are ignored)."""
    shape = targets.shape
    z = _logits(hidden, weight, bias, softcap)
    y = targets.reshape(-1)
    valid = y != ignore_index
    c = torch.ones_like(z[0]) if class_weights is None else class_weights.to(z.dtype)
    zy = z.gather(1, torch.where(valid, y, 0).long()[:, None]).squeeze(1) * valid
    top = z.topk(topk, dim=-1).values.detach().reshape(*shape, topk) if topk else None
    stats = (torch.logsumexp(z, dim=-1), zy, (torch.softmax(z, dim=-1) * z).sum(-1), z @ c, z.argmax(-1))
    return LogitStats(*(t.reshape(shape) for t in stats), top, valid.reshape(shape))


def _divergence(z, r, kind, beta):
    """``[N]``: the ``kind`` divergence between ``softmax(z)`` (policy) and ``softmax(r)`` (reference)."""
    logp, logq = torch.log_softmax(z, dim=-1), torch.log_softmax(r, dim=-1)
    p, q = logp.exp(), logq.exp()
    if kind == "forward_kl":
        return (q * (logq - logp)).sum(-1)
    if kind == "reverse_kl":
        return (p * (logp - logq)).sum(-1)
    m = beta * p + (1 - beta) * q
    return (beta * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
            + (1 - beta) * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1))


def linear_divergence(hidden, weight, ref_hidden, ref_weight, targets=None, *, bias=None, ref_bias=None,
                      kind="forward_kl", beta=0.5, temperature=1.0, token_weights=None, ignore_index=-100,
                      shift=False, reduction="mean", normalizer=None, ref_grad=False, backend="reference"):
    """Materializing :func:`sftkey.linear_divergence` (``backend`` is ignored)."""
    if not ref_grad:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    if targets is None:
        valid = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    else:
        valid = targets != ignore_index
    if shift:
        valid = _shifted(valid, False)
        token_weights = None if token_weights is None else _shifted(token_weights, 0)
    shape = valid.shape
    z = _logits(hidden, weight, bias, None) / temperature
    r = _logits(ref_hidden, ref_weight, ref_bias, None) / temperature
    valid = valid.reshape(-1)
    a = torch.ones_like(z[:, 0]) if token_weights is None else token_weights.reshape(-1).to(z.dtype)
    loss = torch.where(valid, a * _divergence(z, r, kind, beta), torch.zeros_like(z[:, 0]))
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    if normalizer is None:
        denom = (a * valid).sum()
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    else:
        denom = torch.as_tensor(normalizer, dtype=z.dtype, device=z.device).reshape(())
    return loss.sum() / denom
