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
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple, Optional

import torch
from torch import Tensor

from ..backends.engine import PairBlock, RowStats
from .loss import TokenTerms, token_losses


class RowDivergence(NamedTuple):
    """``value`` ``[n]``: ``D_i``; ``dz``, ``dr`` ``[n, V]``: ``g_i dD_i/dz``, ``g_i dD_i/dr`` (None
    where not asked for)."""

    value: Tensor
    dz: Optional[Tensor]
    dr: Optional[Tensor]


#: The divergences of two heads an option may name.
KINDS = ("forward_kl", "reverse_kl", "jsd")
#: the kinds that are functions of per-row statistics (a Triton row kernel's kinds)
KL_KINDS = KINDS[:2]


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


@dataclass(frozen=True)
class Divergence:
    """Which divergence: ``kind``, ``beta`` (JSD) and the temperature both heads' logits are
    divided by; ``kernel_rows``: the backend's own block math for it
    (:meth:`sftkey.backends.engine.Backend.two_head_rows`), else :func:`rows` in torch."""

    kind: str
    beta: float = 0.5
    temperature: float = 1.0
    kernel_rows: Optional[Callable] = None

    def rows(self, z: Tensor, r: Tensor, g: Optional[Tensor] = None, want_dz: bool = True,
             want_dr: bool = False) -> RowDivergence:
        """:func:`rows` of this divergence on a block (overwriting ``z`` and ``r``)."""
        if self.kernel_rows is not None:
            return RowDivergence(*self.kernel_rows(z, r, g, want_dz, want_dr))
        return rows(z, r, self.kind, self.beta, g, want_dz, want_dr)


@dataclass(frozen=True)
class DivergenceBlock:
    """The block function of :func:`sftkey.linear_divergence` (:class:`~sftkey.backends.engine.BlockFn`):
    ``sum_i coef_i D_i`` over the block and its gradients (``coef`` ``[N]``), or, with ``coef``
    None, ``D_i`` per token and no gradient. ``softcap``: the policy's logits are soft-capped
    first (an anchor's)."""

    #: ``z``, ``r``, the factor under a soft-cap, and :func:`rows`'s (JSD: four)
    buffers: ClassVar[int] = 8

    d: Divergence
    coef: Optional[Tensor] = None
    want_dz: bool = True
    want_dr: bool = False
    softcap: Optional[float] = None

    def __call__(self, block: slice, z: Tensor, r: Tensor) -> PairBlock:
        T, cap = self.d.temperature, self.softcap
        if cap is not None:
            z = z.div_(cap).tanh_().mul_(cap)
        if T != 1.0:
            z.div_(T)
            r.div_(T)
        coef = None if self.coef is None else self.coef[block]
        g = None if coef is None else coef / T
        factor = None  # d(capped)/dz = 1 - (capped / cap)^2, taken before rows() overwrites z
        if cap is not None and g is not None:
            factor = z.mul(T / cap).square_().neg_().add_(1)
        out = self.d.rows(z, r, g, self.want_dz, self.want_dr)
        dz = out.dz
        if factor is not None and dz is not None:
            dz.mul_(factor)
        loss = out.value if coef is None else torch.linalg.vecdot(out.value, coef)
        return PairBlock(loss, dz, out.dr)


@dataclass(frozen=True)
class AnchoredBlock:
    """The block function of the anchored cross-entropy: ``(sum_i l_i + sum_i coef_i D_i) /
    scale`` over the block (``l_i`` :func:`sftkey.core.loss.token_losses` on the soft-capped
    policy logits, ``D_i`` the divergence at temperature 1, ``coef`` ``[N]``), ``dz`` where
    ``with_grads``, and the statistics where ``with_stats``."""

    #: the autograd of the cross-entropy on the block holds about ten (measured: 91 MiB at 8)
    buffers: ClassVar[int] = 16

    y: Tensor
    terms: TokenTerms
    softcap: Optional[float]
    coef: Tensor
    scale: Tensor
    d: Divergence
    with_grads: bool
    with_stats: bool

    def __call__(self, block: slice, z: Tensor, r: Tensor) -> PairBlock:
        y, terms, coef = self.y[block], self.terms.select(block), self.coef[block]
        scale = self.scale.to(z.dtype)
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(self.with_grads)
            capped = leaf if self.softcap is None else self.softcap * torch.tanh(leaf / self.softcap)
            stats = _block_stats(capped, y, terms, self.with_stats)
            ce = token_losses(stats, y, terms).sum() / scale
            out = self.d.rows(capped.detach().clone(), r, coef / scale if self.with_grads else None)
            loss = ce.detach() + torch.linalg.vecdot(out.value, coef) / scale
            dz = None
            if self.with_grads:
                dz, = torch.autograd.grad(ce + torch.linalg.vecdot(capped, out.dz).sum(), leaf)
        extra = None
        if self.with_stats:
            extra = RowStats(*(None if t is None else t.detach() for _, t in stats.items()))
        return PairBlock(loss, dz, None, extra)


def _block_stats(z: Tensor, y: Tensor, terms: TokenTerms, all_stats: bool) -> RowStats:
    """The statistics the loss reads from a block's logits ``z`` (all of them, with the argmax,
    where ``all_stats``), differentiable."""
    zy = z.gather(1, y.clamp_min(0)[:, None]).squeeze(1) * (y >= 0)
    S = Z = argmax = None
    if terms.reads_expected_logit or all_stats:
        S = torch.linalg.vecdot(torch.softmax(z, dim=1), z)
    if terms.reads_weighted_logit_sum or all_stats:
        Z = z.sum(dim=1) if terms.class_weights is None else z @ terms.class_weights
    if all_stats:
        argmax = z.detach().argmax(dim=1)
    top = z.detach().amax(dim=1, keepdim=True)  # lse's gradient exp(z - top) / sum: precise at large logits
    lse = top.squeeze(1) + torch.log(torch.exp(z - top).sum(dim=1))
    return RowStats(lse, zy, S, Z, argmax)
