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
the gradients ``g_i dD_i/dz`` and ``g_i dD_i/dr``.

**At large logits.** Both KLs are one formula in a weighting row ``u`` (``r`` for the forward
KL, ``z`` for the reverse) and the other row ``w``, ``KL(softmax(u) || softmax(w))``. Its
gradient ``pu_j (log pu_j - log pw_j - D)`` subtracts two numbers of the size of the logits'
spread (hundreds at logits around ±250) to get a small one, and ``z - logsumexp(z)`` in
float32 already rounds ``log p`` of the largest logit to the ulp of the logit. So each term
is taken relative to the argmax ``k`` of ``u``:

    delta_j = (u_j - u_k) - (w_j - w_k)        (0 at k, exactly)
    E = sum_j pu_j delta_j,   D = E + logsumexp(w - w_k) - log sum_j exp(u_j - u_k)
    dD/du_j = pu_j (delta_j - E),   dD/dw_j = pw_j - pu_j

and ``pu_k (delta_k - E) = -pu_k E`` keeps its relative precision. The JSD's terms are
bounded where ``p`` (or ``q``) is not small (``|log p - log m| <= log(1 / beta)``), so there
the log-probabilities shifted by the row's maximum suffice. ``kernels/pair_rows.py`` computes
the KLs the same way.
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


def _log_softmax_(z: Tensor) -> Tensor:
    """``log softmax(z)`` row by row, in place: ``(z - max) - log sum exp(z - max)``, so the
    largest entry's log-probability keeps its relative precision."""
    z = z.sub_(z.amax(1, keepdim=True))
    return z.sub_(torch.logsumexp(z, 1, keepdim=True))


def _kl_rows(u: Tensor, w: Tensor, g: Optional[Tensor], want_u: bool, want_w: bool):
    """``KL(softmax(u) || softmax(w))`` per row and its gradients scaled by ``g`` ``[n, 1]``
    (module docstring, "At large logits"); ``u`` and ``w`` are overwritten."""
    u_max, k = u.max(1, keepdim=True)
    w_k = w.gather(1, k)
    shift_u = u.sub_(u_max)                               # u - u_k
    log_sum_u = torch.logsumexp(shift_u, 1, keepdim=True)
    pu = (shift_u - log_sum_u).exp_()
    delta = shift_u.sub_(w - w_k)                         # (u - u_k) - (w - w_k), 0 at k
    gap = torch.linalg.vecdot(pu, delta)                  # E
    w_max = w.amax(1, keepdim=True)
    shift_w = w.sub_(w_max)
    log_sum_w = torch.logsumexp(shift_w, 1, keepdim=True)
    value = gap + ((w_max - w_k) + log_sum_w - log_sum_u).squeeze(1)
    d_u = delta.sub_(gap[:, None]).mul_(pu).mul_(g) if g is not None and want_u else None
    d_w = shift_w.sub_(log_sum_w).exp_().sub_(pu).mul_(g) if g is not None and want_w else None
    return value, d_u, d_w


def rows(z: Tensor, r: Tensor, kind: str, beta: float = 0.5, g: Optional[Tensor] = None,
         want_dz: bool = True, want_dr: bool = False) -> RowDivergence:
    """The ``kind`` divergence of each row pair (see the module docstring) and, where ``g``
    ``[n]`` is given, its gradients scaled by ``g``. ``z`` and ``r`` are overwritten (the
    shifted logits, then the gradients, are formed in place: two or three ``[n, V]``
    buffers beside them; four for the JSD)."""
    g = None if g is None else g[:, None]
    if kind in KL_KINDS:  # KL(u || w): forward u = r, w = z; reverse u = z, w = r
        if kind == "forward_kl":
            value, dr, dz = _kl_rows(r, z, g, want_dr, want_dz)
        else:
            value, dz, dr = _kl_rows(z, r, g, want_dz, want_dr)
        return RowDivergence(value, dz, dr)
    logp, logq = _log_softmax_(z), _log_softmax_(r)
    p, q = logp.exp(), logq.exp()
    logm = torch.logaddexp(logp + _log(beta), logq + _log(1 - beta))
    a = logp.sub_(logm).mul_(beta)
    b = logq.sub_(logm).mul_(1 - beta)
    del logm
    value_p, value_q = torch.linalg.vecdot(p, a), torch.linalg.vecdot(q, b)
    dz = a.sub_(value_p[:, None]).mul_(p).mul_(g) if g is not None and want_dz else None
    dr = b.sub_(value_q[:, None]).mul_(q).mul_(g) if g is not None and want_dr else None
    return RowDivergence(value_p + value_q, dz, dr)
