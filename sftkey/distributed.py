"""Linear cross-entropy on ``torch.distributed``: a vocabulary-parallel LM head, and the
global normalizer that makes a data-parallel mean exact.

**Vocabulary parallelism** (:func:`vocab_parallel_linear_cross_entropy`). Every rank of
``group`` holds the same ``hidden`` and ``targets`` and rows ``[vocab_start, vocab_start + V_r)``
of ``W`` (and of the bias); shards may be uneven. Each rank computes the statistics of its
slice of the logits with its backend, and two all-reduces of ``O(N)`` values (a third for the
argmax) turn them into the statistics of the full row (docs/design.md's symbols; ``M`` the largest
local ``lse``); the shard sizes are all-gathered first::

    lse = M + log sum_r exp(lse_r - M)        S = sum_r exp(lse_r - lse) S_r
    zy  = sum_r zy_r  (one rank owns y_i)     Z = sum_r Z_r
    argmax: the largest top-1 logit, ties to the lowest global index

The loss is then :mod:`sftkey.core.loss` on the global statistics, identical on every rank. The
backward hands the backend the global ``lse`` and ``S``, so ``dz`` of the shard's columns is
exact: ``dW``/``db`` are the shard's rows of the full gradient, and ``dX`` (a partial sum over
the shard's columns) is all-reduced once, ``N x D`` in float32. No ``N x V`` tensor is
communicated. Collectives run on ``hidden``'s device: gloo on CPU, nccl on CUDA.

**Data parallelism** (:func:`global_normalizer`): under DDP each rank's ``"mean"`` divides
by its own token count, so the tokens of a rank with fewer valid tokens weigh more.
Passing ``normalizer=global_normalizer(targets)`` divides by the global count instead.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .backends.engine import Backend, Head, Needs, RowStats, StatGrads, accumulation_dtype
from .core import driver
from .core.inputs import flat_targets, flat_weights, prepare
from .core.loss import TokenTerms, nonzero, weight_sum
from .options import LossOptions, with_options
from .results import LossStats

__all__ = ["VocabShardBackend", "global_normalizer", "vocab_parallel_linear_cross_entropy", "weight_total"]

_NO_INDEX = torch.iinfo(torch.int64).max


class VocabShardBackend(Backend):
    """A backend on one shard of the vocabulary whose :class:`RowStats` are those of the full
    logits row: the wrapped backend's local statistics, combined over ``group``. Its backward
    (which receives the global ``lse`` and ``S``) returns the shard's ``dW``, ``db`` and the
    all-reduced ``dX``. Its single pass is the generic one: the forward, the loss's gradients
    on the global statistics, then the backward. ``topk`` is 0 or 1."""

    name = "vocab_parallel"

    def __init__(self, inner: Backend, vocab_start: int, group=None):
        self.inner, self.vocab_start, self.group = inner, vocab_start, group

    def forward(self, head: Head, topk: int = 0) -> RowStats:
        if topk not in (0, 1):
            raise ValueError(f"vocabulary-parallel statistics support topk 0 or 1, got {topk}")
        local = self.inner.forward(head, 1)  # the local top logit combines the argmax
        top = local.topk[:, 0].to(local.lse.dtype)
        peak = torch.stack([local.lse, top])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
        scale = (local.lse - peak[0]).exp()
        sums = torch.stack([scale, scale * local.expected_logit, local.target_logit, local.weighted_logit_sum])
        dist.all_reduce(sums, group=self.group)
        argmax = torch.where(top == peak[1], local.argmax + self.vocab_start, _NO_INDEX)
        dist.all_reduce(argmax, op=dist.ReduceOp.MIN, group=self.group)
        return RowStats(peak[0] + sums[0].log(), sums[2], sums[1] / sums[0], sums[3], argmax,
                        peak[1][:, None] if topk else None)

    def backward(self, head: Head, stats: RowStats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None):
        dx, dw, db = self.inner.backward(head, stats, grads, needs, filter_eps)
        if dx is not None:
            total = dx.to(accumulation_dtype(dx.dtype))
            dist.all_reduce(total, group=self.group)
            dx = total.to(dx.dtype)
        return dx, dw, db


def _shard_layout(size: int, vocab_start: Optional[int], group, device) -> tuple[int, int]:
    """``(vocab_start, V)``: the shard's first row (default: after the shards of the lower
    ranks) and the global vocabulary size, from one all-gather of the shard sizes."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([size], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    V = sum(sizes)
    if vocab_start is None:
        vocab_start = sum(sizes[: dist.get_rank(group)])
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or not 0 <= vocab_start <= V - size:
        raise ValueError(f"vocab_start must be an int in [0, {V - size}] (V={V}, a shard of {size} rows), "
                         f"got {vocab_start!r}")
    return vocab_start, V


@with_options(LossOptions, after="bias")
def vocab_parallel_linear_cross_entropy(hidden: Tensor, weight_shard: Tensor, targets: Tensor, *, group=None,
                                        vocab_start: Optional[int] = None, bias: Optional[Tensor] = None,
                                        options: Optional[LossOptions] = None, **kwargs):
    """:func:`sftkey.linear_cross_entropy` with the LM head split by vocabulary rows over ``group``.

    Call it on every rank of ``group`` with the same ``hidden [..., D]``, ``targets`` (global
    token ids) and options, and this rank's ``weight_shard [V_r, D]`` and ``bias [V_r]``.
    ``vocab_start``: the shard's first global row; None places the shards in rank order.
    ``class_weights`` is the full ``[V]`` vector (``V = sum_r V_r``; label smoothing needs its
    sum over the whole vocabulary). The options are :class:`~sftkey.options.LossOptions`.

    Returns the same loss on every rank (and with ``return_stats`` the same ``LossStats``);
    its backward gives each rank the full ``dX`` and the gradient of its own shard.
    """
    opts = LossOptions.build(options, kwargs, "vocab_parallel_linear_cross_entropy")
    if opts.backend == "reference":
        raise ValueError("backend='reference' materializes the logits; use 'auto', 'torch' or 'triton' per shard")
    if opts.anchor is not None:
        raise ValueError("anchor is not supported on a vocabulary-parallel head: call linear_cross_entropy on the "
                         "full head")
    size = weight_shard.shape[0]
    start, V = _shard_layout(size, vocab_start, group, hidden.device)
    p = prepare(hidden, weight_shard, targets, bias, opts, vocab_size=V)
    # The shard's backend sees local targets (-1: ignored, or another shard's) and class weights' rows.
    y_local = torch.where((p.y >= start) & (p.y < start + size), p.y - start, -1)
    c_local = None if p.head.c is None else p.head.c[start:start + size]
    p = replace(p, head=replace(p.head, y=y_local, c=c_local))
    inner = driver.resolve_backend(opts.backend, p.head.x.device, p.head.x.dtype)
    loss, stats = driver.loss(p, VocabShardBackend(inner, start, group))
    if opts.reduction == "none":
        loss = loss.reshape(p.shape)
    return (loss, LossStats.of(stats, p.y, p.shape)) if opts.return_stats else loss


def global_normalizer(targets: Tensor, *, token_weights: Optional[Tensor] = None,
                      class_weights: Optional[Tensor] = None, ignore_index: int = -100,
                      shift: bool = False, group=None) -> Tensor:
    """The ``normalizer=`` that makes data-parallel training minimize the global mean.

    Returns ``sum over ranks of sum_i a_i w_{y_i} (non-ignored tokens) / world_size``: the
    ``"mean"`` denominator of the whole global batch (the token count without weights; 1 if
    it is 0), divided by the world size because DDP *averages* gradients over ranks. Each
    rank then computes ``linear_cross_entropy(..., normalizer=global_normalizer(targets))``
    and the averaged gradient is exactly that of the mean over all ranks' tokens, however
    unevenly the valid tokens are spread; averaging the ranks' losses gives the global mean.
    Call it with the same ``targets``, weights, ``ignore_index`` and ``shift`` as the loss, on
    every rank of ``group`` (one all-reduce of a scalar). Returns a float64 scalar tensor.

    * Gradient accumulation over ``k`` micro-batches: call it on the step's micro-batches'
      targets concatenated, and sum (do not average) the micro-batch losses.
    * Hugging Face ``Trainer``: its ``num_items_in_batch`` already counts the non-ignored
      labels over all accumulation steps and (with ``average_tokens_across_devices``) all
      ranks, and the Trainer itself multiplies the loss by the world size; so a
      ``compute_loss_func`` passes ``normalizer=num_items_in_batch``, not this. For a
      weighted mean there, pass ``world_size * global_normalizer(...)`` of the whole step.
    * ``accelerate``: ``accelerator.backward`` on a DDP-prepared model averages like DDP;
      use this function as is.
    """
    total = weight_total(targets, token_weights=token_weights, class_weights=class_weights,
                         ignore_index=ignore_index, shift=shift)
    dist.all_reduce(total, group=group)
    return nonzero(total) / dist.get_world_size(group)


def weight_total(targets: Tensor, *, token_weights: Optional[Tensor] = None,
                 class_weights: Optional[Tensor] = None, ignore_index: int = -100, shift: bool = False) -> Tensor:
    """``sum_i a_i w_{y_i}`` over the non-ignored tokens of ``targets`` (their count without
    weights; 0 if there are none): the ``"mean"`` denominator of these targets alone, as a
    float64 scalar tensor on ``targets``' device. Weights are indexed like ``targets`` and
    shift with them."""
    y = flat_targets(targets, ignore_index, shift)
    if token_weights is not None and token_weights.shape != targets.shape:
        raise ValueError(f"token_weights must have the shape of targets {tuple(targets.shape)}, "
                         f"got {tuple(token_weights.shape)}")
    terms = TokenTerms(vocab_size=0, token_weights=flat_weights(token_weights, shift, torch.float64),
                       class_weights=None if class_weights is None else class_weights.to(y.device, torch.float64))
    return weight_sum(y, terms, torch.float64)
