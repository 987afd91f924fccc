"""The two-head pass of the torch backend: a policy head and a reference head over the same
tokens, group by group, never an ``N x V`` buffer (docs/design.md, "Two heads").

A :class:`Pair` holds two :class:`~.base.Head`\\ s with the same vocabulary ``V`` and tokens
(``D_ref`` may differ from ``D``). Rows go in groups of ``R`` rows: the group's two logits products ``[R, V]`` fill half of
:data:`sftkey.config.chunk_budget_bytes` each, and each group is worked through in blocks
whose float32 work (the block function's ``buffers`` rows of ``V``) fills a quarter of it.
Large groups keep the products large (``dW += dz^T X`` sums over ``R`` rows, once per group).
Per group:

* the logits products ``z = x W^T (+ b)`` and ``r = x_ref W_ref^T (+ b_ref)`` in the products'
  dtype (:func:`.products.product_dtype`: the inputs', or float32 from bf16/fp16 inputs
  where those products are not native; W is then up-cast once, a float32 buffer of its size);
* block by block, the caller's block function on ``(z, r)`` in the accumulation dtype: the
  block's loss and its ``dz``, ``dr`` (each None where not needed), left in the group's
  products buffers;
* the gradient products ``dX = dz W``, ``dW += dz^T X``, ``db += sum dz`` (and the same for
  the reference with ``dr``); ``dW`` sums in the accumulation dtype (a float32 buffer of W's
  size for a bf16/fp16 W).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from .. import config
from .base import Head, Needs, accumulation_dtype
from .products import product_dtype
from .torch import _ROW_ALIGN, _STAGING_BYTES, _rows


class PairBlock(NamedTuple):
    """A group's result from the block function: its loss (a scalar, or ``[n]`` per token),
    ``dz`` and ``dr`` ``[n, V]`` in the accumulation dtype or None, and anything else the
    caller keeps (``extra``)."""

    loss: Tensor
    dz: Optional[Tensor] = None
    dr: Optional[Tensor] = None
    extra: object = None


class BlockFn(Protocol):
    """``block_fn(group, z, r) -> PairBlock``: ``group`` a slice of the tokens, ``z`` and ``r``
    ``[n, V]`` their logits (bias added) in the accumulation dtype, which it may overwrite.
    ``buffers``: how many ``[n, V]`` buffers of the accumulation dtype it holds at most, the
    two given included (the blocks' rows are sized by it)."""

    buffers: int

    def __call__(self, group: slice, z: Tensor, r: Tensor) -> PairBlock: ...


@dataclass(frozen=True)
class Pair:
    """The policy and reference heads (their ``rows`` the same tokens; ``y``, ``c`` and
    ``softcap`` are the block function's business, not the pass's)."""

    policy: Head
    ref: Head

    @property
    def tokens(self) -> int:
        return self.policy.y.shape[0]


class PairResult(NamedTuple):
    """Every group's :class:`PairBlock`, and the gradients ``(dx, dw, db)`` of each head (None
    where not needed)."""

    blocks: list
    policy_grads: tuple
    ref_grads: tuple


class _Operands:
    """One head's operands in the products' dtype, its gradients and their sums."""

    def __init__(self, head: Head, needs: Needs):
        x, w = head.x, head.w
        self.head, self.acc = head, accumulation_dtype(x.dtype)
        self.pdtype = product_dtype(x.device, x.dtype)
        self.w = w if w.dtype == self.pdtype else w.to(self.pdtype)
        self.b = None if head.b is None else head.b.to(self.acc)
        self.dx = None
        if needs.dx:
            self.dx = torch.empty_like(x) if head.rows is None else torch.zeros_like(x)
        self.dw = torch.zeros(w.shape, dtype=self.acc, device=w.device) if needs.dw else None
        self.db = torch.zeros(w.shape[0], dtype=self.acc, device=w.device) if needs.db and head.b is not None else None

    def hidden(self, group: slice) -> Tensor:
        x = self.head.x
        x = x[group] if self.head.rows is None else x.index_select(0, self.head.rows[group])
        return x.to(self.pdtype)

    def logits(self, x: Tensor, out: Tensor) -> Tensor:
        """A group's logits products ``[R, V]`` in the products' dtype (no bias), into the
        first ``R`` rows of ``out`` (one buffer for every group: the allocator is not asked
        for a new one per group)."""
        return torch.mm(x, self.w.t(), out=out[: x.shape[0]])

    def products_buffer(self, rows: int) -> Tensor:
        return torch.empty(rows, self.w.shape[0], dtype=self.pdtype, device=self.w.device)

    def block_logits(self, out: Tensor) -> Tensor:
        """A block's rows ``out`` of the group's products as logits in the accumulation dtype,
        bias added (in place where the dtypes agree)."""
        z = out.to(self.acc)
        return z if self.b is None else z.add_(self.b)

    def keep(self, out: Tensor, dz: Tensor) -> None:
        """Leave a block's ``dz`` in its rows ``out`` of the group's products (for the gradient
        products); ``db`` sums in the accumulation dtype."""
        if self.db is not None:
            self.db.add_(dz.sum(dim=0))
        if dz.data_ptr() != out.data_ptr():
            out.copy_(dz)

    def add(self, group: slice, dz: Tensor, x: Tensor) -> None:
        """The gradient products of a group's ``dz`` (its products' buffer) and hidden states ``x``."""
        if self.dx is not None:
            part = torch.mm(dz, self.w).to(self.dx.dtype)
            if self.head.rows is None:
                self.dx[group] = part
            else:
                self.dx.index_copy_(0, self.head.rows[group], part)
        if self.dw is not None:
            if self.pdtype == self.acc:
                self.dw.addmm_(dz.t(), x)
            else:  # native bf16/fp16 products: slices of V, so no W-sized temporary per group
                step = max(_ROW_ALIGN, _STAGING_BYTES // (x.shape[1] * x.element_size()))
                for v in range(0, dz.shape[1], step):
                    self.dw[v:v + step].add_(torch.mm(dz[:, v:v + step].t(), x))

    def grads(self) -> tuple:
        head = self.head
        dw = None if self.dw is None else self.dw.to(head.w.dtype)
        db = None if self.db is None else self.db.to(head.b.dtype)
        return self.dx, dw, db


def pair_pass(pair: Pair, block_fn: BlockFn, needs: Needs, ref_needs: Needs) -> PairResult:
    """Run ``block_fn`` over the blocks of ``pair``'s tokens and form the gradients it returns."""
    n, V = pair.tokens, pair.policy.w.shape[0]
    policy, ref = _Operands(pair.policy, needs), _Operands(pair.ref, ref_needs)
    budget = config.chunk_budget_bytes
    step = _rows(budget // 2, V * policy.pdtype.itemsize, n)
    block_step = _rows(budget // 4, V * policy.acc.itemsize * block_fn.buffers, step)
    buffers = policy.products_buffer(step), ref.products_buffer(step)
    blocks = []
    for start in range(0, n, step):
        group = slice(start, min(start + step, n))
        blocks += _group(group, policy, ref, buffers, block_fn, block_step, any(needs), any(ref_needs))
    return PairResult(blocks, policy.grads(), ref.grads())


def _group(group: slice, policy: _Operands, ref: _Operands, buffers: tuple, block_fn: BlockFn, block_step: int,
           grads: bool, ref_grads: bool) -> list:
    """One group's products (into ``buffers``), its blocks and its gradient products; nothing
    of it outlives the call but the blocks' losses."""
    x, x_ref = policy.hidden(group), ref.hidden(group)
    z_out, r_out = policy.logits(x, buffers[0]), ref.logits(x_ref, buffers[1])
    blocks, formed, formed_ref = [], False, False
    for b0 in range(0, group.stop - group.start, block_step):
        rows = slice(b0, min(b0 + block_step, group.stop - group.start))
        z, r = policy.block_logits(z_out[rows]), ref.block_logits(r_out[rows])
        block = block_fn(slice(group.start + rows.start, group.start + rows.stop), z, r)
        if block.dz is not None and grads:
            policy.keep(z_out[rows], block.dz)
            formed = True
        if block.dr is not None and ref_grads:
            ref.keep(r_out[rows], block.dr)
            formed_ref = True
        blocks.append(block._replace(dz=None, dr=None))
    if formed:
        policy.add(group, z_out, x)
    if formed_ref:
        ref.add(group, r_out, x_ref)
    return blocks
