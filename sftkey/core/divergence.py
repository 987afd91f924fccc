"""The divergences between two heads' distributions, row by row (docs/design.md, "Two heads"),
written once: the per-token value and its gradients with respect to both rows of logits.

With ``p = softmax(z)`` (the policy) and ``q = softmax(r)`` (the reference), rows ``[n, V]``
in the accumulation dtype, already divided by the temperature::

    forward_kl  D = KL(q || p) = sum_j q_j (log q_j - log p_j)   dD/dz_j = p_j - q_j
                                                                 dD/dr_j = q_j (log q_j - log p_j - D)
    reverse_kl  D = KL(p || q)                                   dD/dz_j = p_j (log p_j - log q_j - D)
                                                                 dD/dr_j = q_j - p_j
    jsd         D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                with a_j = beta (log p_j - log m_j), b_j = (1 - beta) (log q_j - log m_j):
                D = sum_j p_j a_j + sum_j q_j b_j,             dD/dz_j = p_j (a_j - sum_k p_k a_k)
                                                                 dD/dr_j = q_j (b_j - sum_k q_k b_k)

(``dD/dp_j = a_j`` for the JSD, through the softmax.) A token with coefficient ``g_i`` gets
the gradients ``g_i dD_i/dz`` and ``g_i dD_i/dr``; ``forward_kl`` and ``reverse_kl`` are
``E_q[r] - lse_r - E_q[z] + lse_z`` and ``S - lse_z - E_p[r] + lse_r`` written on the
log-probabilities.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class RowDivergence(NamedTuple):
    """``value`` ``[n]``: ``D_i``; ``dz``, ``dr`` ``[n, V]``: ``g_i dD_i/dz``, ``g_i dD_i/dr`` (None
    where not asked for)."""

    value: Tensor
    dz: Optional[Tensor]
    dr: Optional[Tensor]


#: the kinds that are functions of per-row statistics (the Triton row kernels' kinds)
KL_KINDS = ("forward_kl", "reverse_kl")


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def rows(z: Tensor, r: Tensor, kind: str, beta: float = 0.5, g: Optional[Tensor] = None,
         want_dz: bool = True, want_dr: bool = False) -> RowDivergence:
    """The ``kind`` divergence of each row pair (see the module docstring) and, where ``g``
    ``[n]`` is given, its gradients scaled by ``g``. ``z`` and ``r`` are overwritten (the
    log-probabilities, then the gradients, are formed in place: two to four ``[n, V]``
    buffers beside them)."""
    logp = z.sub_(torch.logsumexp(z, dim=1, keepdim=True))
    logq = r.sub_(torch.logsumexp(r, dim=1, keepdim=True))
    grads = g is not None
    g = None if g is None else g[:, None]
    if kind in KL_KINDS:  # KL(a || o): forward a = q, o = p; reverse a = p, o = q
        forward = kind == "forward_kl"
        log_a, log_o = (logq, logp) if forward else (logp, logq)
        want_a, want_o = (want_dr, want_dz) if forward else (want_dz, want_dr)
        pa = log_a.exp()
        diff = log_a.sub_(log_o)  # log a - log o
        value = torch.linalg.vecdot(pa, diff)
        d_a = diff.sub_(value[:, None]).mul_(pa).mul_(g) if grads and want_a else None
        d_o = log_o.exp_().sub_(pa).mul_(g) if grads and want_o else None
        return RowDivergence(value, d_o, d_a) if forward else RowDivergence(value, d_a, d_o)
    p, q = logp.exp(), logq.exp()
    logm = torch.logaddexp(logp + _log(beta), logq + _log(1 - beta))
    a = logp.sub_(logm).mul_(beta)
    b = logq.sub_(logm).mul_(1 - beta)
    del logm
    value_p, value_q = torch.linalg.vecdot(p, a), torch.linalg.vecdot(q, b)
    dz = a.sub_(value_p[:, None]).mul_(p).mul_(g) if grads and want_dz else None
    dr = b.sub_(value_q[:, None]).mul_(q).mul_(g) if grads and want_dr else None
    return RowDivergence(value_p + value_q, dz, dr)
