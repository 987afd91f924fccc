"""The group engine beneath the backends: what a backend is given and returns (the contract),
and the one loop over groups of token rows that the torch backend, the triton backend's single
pass and the two-head pass share (:func:`run`, :class:`Operand`).

Terms (docs/design.md, "Terms"): a *group* is consecutive token rows whose logits products are
formed together into one buffer, the *chunk*, within :data:`sftkey.config.chunk_budget_bytes`;
a *block* is rows of a group worked through in the accumulation dtype; a *tile* is what one
Triton program holds at once.

**The contract.** A backend sees a :class:`Head`, flattened and validated (docs/design.md's
symbols):

* ``x``  ``[M, D]`` hidden states, ``w`` ``[V, D]`` LM head, ``b`` ``[V]`` or None; one dtype
  of :data:`FLOAT_DTYPES`, contiguous, one device.
* ``rows`` ``[N]`` int64 or None: the rows of ``x`` that are the tokens (None: all, ``N = M``).
  A loss skips the tokens that have none this way; ``dX`` is zero on the other rows.
* ``y``  ``[N]`` int64 targets, ``-1`` where the token has no target: its target logit is 0
  and it receives no one-hot gradient.
* ``c``  ``[V]`` class weights in the accumulation dtype, or None (ones): ``Z_i = sum_j c_j z_ij``.
* ``softcap`` ``cap > 0`` or None: ``z <- cap * tanh(z / cap)``.

Logits ``z = x w^T + b`` (then soft-capped) never exist beyond a chunk. Statistics are
float32 (float64 for float64 inputs); gradients come back in the dtype of their input.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .. import config
from . import products

#: The accepted input dtypes, and the low-precision ones among them.
LOWP_DTYPES = products.LOWP_DTYPES
FLOAT_DTYPES = (torch.float32, *LOWP_DTYPES, torch.float64)
#: The most top-k logits a backend returns per token.
MAX_TOPK = 32
#: Groups and blocks hold a multiple of this many rows (at least this many).
ROW_ALIGN = 16
#: float32 slices of a bf16/fp16 W where its products are formed in float32.
UPCAST_BYTES = 4 << 20
#: float32 staging of one slice of dW on a CPU: stays in cache, keeps the products large (on
#: CUDA a slice takes a chunk's bytes: few large products).
STAGING_BYTES = 2 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and sums are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_within(budget: int, bytes_per_row: int, n: int) -> int:
    """Rows of ``bytes_per_row`` that fit ``budget``: a multiple of 16 (at least 16), at most ``n``."""
    return min(n, max(ROW_ALIGN, budget // bytes_per_row // ROW_ALIGN * ROW_ALIGN))


def rows_per_group(n: int, bytes_per_row: int, budget: int, single_group_bonus: int = 0) -> int:
    """Rows of one group: all ``n`` where their chunk fits ``budget`` plus ``single_group_bonus``
    (the bytes of a float32 ``dW`` sum, which a single group does not need), else
    :func:`rows_within` the budget."""
    if single_group_bonus and n * bytes_per_row <= budget + single_group_bonus:
        return n
    return rows_within(budget, bytes_per_row, n)


def slices(start: int, stop: int, step: int):
    """Consecutive slices of ``[start, stop)``, ``step`` long (the last may be shorter)."""
    for s in range(start, stop, step):
        yield slice(s, min(s + step, stop))


# ---- the contract ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Head:
    """The inputs that define one head's logits, as a backend receives them (module docstring)."""

    x: Tensor
    w: Tensor
    b: Optional[Tensor]
    y: Tensor
    c: Optional[Tensor]
    softcap: Optional[float]
    rows: Optional[Tensor] = None

    @property
    def tokens(self) -> int:
        return self.y.shape[0]

    def gathered(self) -> "Head":
        """The same tokens with their hidden states copied out (``rows`` None)."""
        return self if self.rows is None else replace(self, x=self.x.index_select(0, self.rows), rows=None)

    def scattered(self, dx: Optional[Tensor]) -> Optional[Tensor]:
        """``dX`` of :meth:`gathered`'s rows as the gradient of the whole ``x`` (zero elsewhere)."""
        if dx is None or self.rows is None:
            return dx
        return torch.zeros_like(self.x).index_copy_(0, self.rows, dx)

    def selected(self, rows: Tensor) -> "Head":
        """The tokens at ``rows`` (indices into this head's tokens, which have no ``rows`` yet)."""
        return replace(self, rows=rows, y=self.y[rows])


@dataclass(frozen=True)
class Pair:
    """A policy head and a reference head over the same tokens and vocabulary (``D`` may
    differ); ``y``, ``c`` and ``softcap`` are the block function's business."""

    policy: Head
    ref: Head

    @property
    def tokens(self) -> int:
        return self.policy.tokens

    def selected(self, rows: Tensor) -> "Pair":
        return Pair(self.policy.selected(rows), self.ref.selected(rows))


@dataclass(frozen=True)
class RowStats:
    """Per-token statistics of the logits rows, each ``[N]`` unless stated.

    ``lse``: logsumexp_j z_ij; ``target_logit``: z_{i,y_i} (0 where y_i < 0);
    ``expected_logit``: S_i = sum_j p_ij z_ij; ``weighted_logit_sum``: Z_i = sum_j c_j z_ij;
    ``argmax``: int64 argmax_j z_ij; ``topk``: ``[N, k]`` the k largest logits, descending.
    The last four are None where not computed (a single pass told they are not read; no
    top-k asked for).
    """

    lse: Tensor
    target_logit: Tensor
    expected_logit: Optional[Tensor] = None
    weighted_logit_sum: Optional[Tensor] = None
    argmax: Optional[Tensor] = None
    topk: Optional[Tensor] = None

    def items(self):
        """``(name, tensor or None)`` for every statistic, in field order."""
        return ((f.name, getattr(self, f.name)) for f in fields(self))

    @classmethod
    def cat(cls, parts: list) -> "RowStats":
        """The statistics of consecutive blocks of rows, concatenated."""
        if len(parts) == 1:
            return parts[0]
        return cls(**{name: None if value is None else torch.cat([getattr(p, name) for p in parts])
                      for name, value in parts[0].items()})

    @classmethod
    def interleave(cls, keep: Tensor, kept: "RowStats", others: "RowStats") -> "RowStats":
        """Every token's statistics from ``kept`` (the tokens where ``keep``) and ``others`` (the
        rest, in order); a statistic ``kept`` lacks stays None."""
        merged = {}
        for name, part in kept.items():
            rest = getattr(others, name)
            if part is None or rest is None:
                merged[name] = None
                continue
            full = part.new_empty((keep.shape[0], *part.shape[1:]))
            full[keep], full[~keep] = part, rest
            merged[name] = full
        return cls(**merged)


class StatGrads(NamedTuple):
    """Upstream gradients of the four differentiable statistics, each ``[N]`` or None (zero)."""

    lse: Optional[Tensor]
    target_logit: Optional[Tensor]
    expected_logit: Optional[Tensor]
    weighted_logit_sum: Optional[Tensor]

    def select(self, index) -> "StatGrads":
        return StatGrads(*(None if g is None else g[index] for g in self))


class Needs(NamedTuple):
    """Which gradients to form: ``dx``, ``dw``, ``db``."""

    dx: bool
    dw: bool
    db: bool


NO_GRADS = Needs(False, False, False)


class Reads(NamedTuple):
    """Which statistics beyond ``lse`` and ``target_logit`` a single pass's caller reads; a
    backend may skip the others and return None for them."""

    expected_logit: bool = True
    weighted_logit_sum: bool = True
    argmax: bool = True


class BlockResult(NamedTuple):
    """A block's share of a single pass's scalar loss, and its upstream gradients with respect
    to the block's statistics (all None where no gradient is formed)."""

    loss: Tensor
    grads: StatGrads


class BlockLoss(Protocol):
    """The loss of a single pass, block by block: called with a block of rows (a slice of the
    head's tokens) and their statistics."""

    def __call__(self, block: slice, stats: RowStats) -> BlockResult: ...


class SinglePassResult(NamedTuple):
    loss: Tensor
    stats: RowStats
    dx: Optional[Tensor]
    dw: Optional[Tensor]
    db: Optional[Tensor]


class PairBlock(NamedTuple):
    """A block function's result (:class:`BlockFn`): its loss (a scalar, or ``[n]`` per token),
    ``dz`` and ``dr`` ``[n, V]`` in the accumulation dtype or None, and anything else the caller
    keeps (``extra``)."""

    loss: Tensor
    dz: Optional[Tensor] = None
    dr: Optional[Tensor] = None
    extra: object = None


class BlockFn(Protocol):
    """``block_fn(block, z, r) -> PairBlock``: ``block`` a slice of the tokens, ``z`` and ``r``
    ``[n, V]`` their logits (bias added) in the accumulation dtype, which it may overwrite.
    ``buffers``: how many ``[n, V]`` buffers of the accumulation dtype it holds at most, the two
    given included (the blocks' rows are sized by it)."""

    buffers: int

    def __call__(self, block: slice, z: Tensor, r: Tensor) -> PairBlock: ...


class PairResult(NamedTuple):
    """Every block's :class:`PairBlock` (``dz``/``dr`` dropped), and each head's ``(dx, dw, db)``."""

    blocks: list
    policy_grads: tuple
    ref_grads: tuple


# ---- the engine -----------------------------------------------------------------------------

class Operand:
    """One head's side of a pass over groups (:func:`run`): the group's hidden states (gathered
    where the head has ``rows``), its logits products into the chunk ``out`` ``[R, V]``, and the
    gradient products of the ``dz`` left there, ``dX = dz W``, ``dW += dz^T X``, ``db += sum dz``.

    The products take ``logits_dtype``: the inputs' dtype, or float32 from bf16/fp16 inputs,
    formed from float32 copies (*upcast*: the hidden states into ``x32``, ``W`` slice by slice
    into ``w32``) or, with ``float32_output``, by ``torch.mm(..., out_dtype=float32)`` from the
    inputs themselves; ``dz`` then overlays ``out`` in the inputs' dtype (:meth:`dz`).

    ``dW`` sums across groups in the accumulation dtype: a float32 ``W``'s sum is the products'
    own (``addmm_`` in place); a single group's is one product (summed in float32 inside it);
    a bf16/fp16 ``W`` over several groups sums in a float32 buffer of its size, by ``addmm_``
    from float32 products, by a float32-output ``addmm`` per group where ``float32_sums`` and
    the device has one (:func:`.products.float32_sums`), else slice by slice through a staging pair sized to stay in cache, the last group
    writing each slice's sum in W's dtype while it is there. ``db`` sums in the accumulation
    dtype; ``dX`` is each group's rows."""

    def __init__(self, head: Head, needs: Needs, group_rows: int, logits_dtype: torch.dtype,
                 float32_output: bool = False, float32_sums: bool = False):
        x, w = head.x, head.w
        (V, D), n = w.shape, head.tokens
        self.head, self.group_rows = head, group_rows
        self.acc = accumulation_dtype(x.dtype)
        self.float32_output = float32_output and logits_dtype != x.dtype
        self.upcast = logits_dtype != x.dtype and not self.float32_output
        self.float32_sums = float32_sums and x.dtype in LOWP_DTYPES and products.float32_sums(x.device.type, x.dtype)
        acc = dict(dtype=self.acc, device=x.device)
        self.out = torch.empty(group_rows, V, dtype=logits_dtype, device=x.device)
        self.b = None if head.b is None else head.b.to(self.acc)
        self.xg = None if head.rows is None else x.new_empty(group_rows, D)
        if self.upcast:
            self.x32 = torch.empty(group_rows, D, **acc)
            self.w32 = torch.empty(min(V, max(ROW_ALIGN, UPCAST_BYTES // (D * 4))), D, **acc)
        self.dx = self.dx_part = self.dx32 = None
        if needs.dx:  # rows not in head.rows keep a zero gradient; the others go through dx_part
            self.dx = torch.empty_like(x) if head.rows is None else torch.zeros_like(x)
            self.dx_part = None if head.rows is None else x.new_empty(group_rows, D)
            self.dx32 = torch.empty(group_rows, D, **acc) if self.upcast else None
        self.db = torch.zeros(V, **acc) if needs.db and head.b is not None else None
        self.dw = torch.empty_like(w) if needs.dw else None
        self.sum = self.stage = self.stage_lo = None
        self.first = True
        if self.dw is not None and w.dtype != self.acc:
            several = n > group_rows
            if several:
                self.sum = torch.empty(w.shape, **acc)
            # native products of several groups summed without a float32-output addmm, or
            # float32 products of one group: through the staging pair
            if several != self.upcast and not (several and self.float32_sums):
                staging = STAGING_BYTES if x.device.type == "cpu" else max(STAGING_BYTES, self.out.numel() * 4)
                self.v_slice = max(ROW_ALIGN, staging // (D * 4))
                self.stage = torch.empty(min(self.v_slice, V), D, **acc)
                if not self.upcast:
                    self.stage_lo = torch.empty(min(self.v_slice, V), D, dtype=w.dtype, device=w.device)

    def hidden(self, group: slice) -> Tensor:
        """The hidden states of a group's tokens: a view of ``x``, or gathered from ``rows``."""
        x, rows = self.head.x, self.head.rows
        if rows is None:
            return x[group]
        return torch.index_select(x, 0, rows[group], out=self.xg[: group.stop - group.start])

    def products(self, group: slice) -> Tensor:
        """The group's logits products (no bias) into its chunk; returns the hidden states the
        gradient products take (float32 copies where the products are upcast)."""
        x, w = self.hidden(group), self.head.w
        out = self.chunk(group)
        if self.float32_output:
            products.mm_float32(x, w.t(), out)
        elif not self.upcast:
            products.LOGITS(x, w.t(), out)
        else:
            x = self.x32[: out.shape[0]].copy_(x)
            for cols, w32 in self.weight_slices():
                torch.mm(x, w32.t(), out=out[:, cols])
        return x

    def chunk(self, group: slice) -> Tensor:
        """The group's rows of the chunk ``out`` (its logits products, later its ``dz``)."""
        return self.out[: group.stop - group.start]

    def dz(self, group: slice) -> Tensor:
        """Where the group's ``dz`` goes for the gradient products: its chunk, or with
        ``float32_output`` a view of it in the inputs' dtype at the chunk's row stride (the
        overlay; its rows' gap must hold finite values when the products read it)."""
        out = self.chunk(group)
        return out.view(self.head.x.dtype)[:, : out.shape[1]] if self.float32_output else out

    def keep(self, group: slice, rows: slice, dz: Tensor) -> None:
        """Leave the ``dz`` of rows ``rows`` of the group (a block) where the gradient products
        read it (:meth:`dz`), in its dtype; with ``float32_output``, zero those rows' gap."""
        target = self.dz(group)[rows]
        if dz.data_ptr() != target.data_ptr():
            target.copy_(dz)
        if self.float32_output:
            self.chunk(group)[rows].view(self.head.x.dtype)[:, self.out.shape[1]:].zero_()

    def block_logits(self, o: Tensor) -> Tensor:
        """A block's rows ``o`` of the chunk as logits in the accumulation dtype, bias added (in
        place where the dtypes agree)."""
        z = o.to(self.acc)
        return z if self.b is None else z.add_(self.b)

    def weight_slices(self):
        """``(cols, W[cols] in float32)`` for consecutive slices of W's rows, through ``w32``."""
        w, step = self.head.w, self.w32.shape[0]
        for cols in slices(0, w.shape[0], step):
            yield cols, self.w32[: cols.stop - cols.start].copy_(w[cols])

    def add(self, group: slice, x: Tensor) -> None:
        """The gradient products of the group's ``dz`` (:meth:`dz`) and hidden states ``x``."""
        head, rows = self.head, self.head.rows
        dz = self.dz(group)
        if self.db is not None:
            self.db.add_(dz.sum(dim=0, dtype=self.db.dtype))
        if self.dx is not None:
            part = self.dx[group] if rows is None else self.dx_part[: group.stop - group.start]
            if self.dx32 is not None:
                self._dx_upcast(dz, part)
            else:
                products.DX(dz, head.w, part)
            if rows is not None:
                self.dx.index_copy_(0, rows[group], part)
        if self.dw is None:
            return
        last = group.stop == head.tokens
        if self.float32_sums and self.sum is not None:
            if self.first:
                self.sum.zero_()
            products.addmm_float32(self.sum, dz.t(), x)
            if last:
                self.dw.copy_(self.sum)
        elif self.stage is not None:
            self._add_staged(dz, x, last)
        else:
            total = self.dw if self.sum is None else self.sum
            products.DW(dz.t(), x, total, accumulate=not self.first)
            if last and self.sum is not None:
                self.dw.copy_(self.sum)
        self.first = False

    def _dx_upcast(self, dz: Tensor, part: Tensor) -> None:
        """A group's ``dX = dz W`` in float32, over the float32 slices of W, into ``part``."""
        total = self.dx32[: dz.shape[0]]
        for i, (cols, w) in enumerate(self.weight_slices()):
            if i == 0:
                torch.mm(dz[:, cols], w, out=total)
            else:
                total.addmm_(dz[:, cols], w)
        part.copy_(total)

    def _add_staged(self, dz: Tensor, x: Tensor, last: bool) -> None:
        """A group's bf16/fp16 ``dW`` slice by slice: native products through the staging pair
        into the float32 sums, or a single group's float32 products to W's dtype."""
        stage = self.stage if self.stage_lo is None else self.stage_lo
        for cols in slices(0, dz.shape[1], self.v_slice):
            k = cols.stop - cols.start
            part = stage[:k]
            products.DW(dz[:, cols].t(), x, part)
            if self.sum is None:
                self.dw[cols].copy_(part)
            elif self.first:
                self.sum[cols].copy_(part)
            elif last:
                self.dw[cols].copy_(self.stage[:k].copy_(part).add_(self.sum[cols]))
            else:
                self.sum[cols].add_(self.stage[:k].copy_(part))

    def result(self) -> tuple:
        """``(dx, dw, db)``, each None where not formed."""
        db = None if self.db is None else self.db.to(self.head.b.dtype)
        return self.dx, self.dw, db


#: ``work(group, chunks) -> formed``: reads each operand's chunk of the group and returns, per
#: operand, whether it left that operand's ``dz`` in :meth:`Operand.dz`.
Work = Callable[[slice, list], Sequence[bool]]


def run(operands: Sequence[Operand], work: Work) -> None:
    """The loop over groups: each operand's logits products of the group, then ``work`` on
    them, then the gradient products of each operand whose ``dz`` it formed."""
    first = operands[0]
    for group in slices(0, first.head.tokens, first.group_rows):
        xs = [op.products(group) for op in operands]
        formed = work(group, [op.chunk(group) for op in operands])
        for op, x, done in zip(operands, xs, formed):
            if done:
                op.add(group, x)


class Backend:
    """A way to compute a head's :class:`RowStats` and their backward, and the two-head pass.
    Subclasses implement ``forward`` and ``backward``; ``single_pass`` may be overridden where
    the loss's gradients can be formed during the forward (docs/design.md, "Single pass"), and
    ``two_head_rows`` where the backend has its own block math for a divergence."""

    name: str = "base"

    def available(self, device: torch.device) -> bool:
        return True

    def forward(self, head: Head, topk: int = 0) -> RowStats:
        """Every statistic of every token (``topk``: also the ``topk`` largest logits)."""
        raise NotImplementedError

    def backward(self, head: Head, stats: RowStats, grads: StatGrads, needs: Needs,
                 filter_eps: Optional[float] = None) -> tuple:
        """``(dx, dw, db)`` for the upstream ``grads``; an entry is None where not needed.

        Only ``stats.lse`` and ``stats.expected_logit`` are read (the full row's, also on a
        vocabulary shard). ``filter_eps``: skip the dense products of tiles whose
        probabilities are all below it (None: exact)."""
        raise NotImplementedError

    def single_pass(self, head: Head, block_loss: BlockLoss, needs: Needs, reads: Reads = Reads(),
                    filter_eps: Optional[float] = None) -> SinglePassResult:
        """The loss given block by block, its statistics and, where ``needs``, its gradients.
        With ``needs`` all False it is the loss alone (forward only, ``2NDV``).

        This generic version runs the forward over all tokens as one block, takes the loss's
        gradients, then the backward (8NDV FLOPs); backends override it to do better."""
        stats = self.forward(head)
        block = block_loss(slice(None), stats)
        if not any(needs):
            return SinglePassResult(block.loss, stats, None, None, None)
        return SinglePassResult(block.loss, stats, *self.backward(head, stats, block.grads, needs, filter_eps))

    def two_head_rows(self, kind: str, dtype: torch.dtype, device: torch.device):
        """The backend's own block math for the ``kind`` divergence of two heads' rows, with
        :func:`sftkey.core.divergence.rows`'s contract, or None: that one, in torch."""
        return None

    def pair_pass(self, pair: Pair, block_fn: BlockFn, needs: Needs, ref_needs: Needs) -> PairResult:
        """Two heads over the same tokens (docs/design.md, "Two heads"): both heads' logits
        products in groups (each half of the chunk budget, in the torch backend's product
        dtype), ``block_fn`` on blocks of them in the accumulation dtype (a quarter of the
        budget over its ``buffers``), and the gradient products of the ``dz``, ``dr`` it
        returns."""
        heads, budget = (pair.policy, pair.ref), config.chunk_budget_bytes
        dtypes = [products.product_dtype(h.x.device, h.x.dtype) for h in heads]
        V = pair.policy.w.shape[0]
        group_rows = rows_within(budget, V * sum(d.itemsize for d in dtypes), pair.tokens)
        operands = [Operand(h, nd, group_rows, d) for h, nd, d in zip(heads, (needs, ref_needs), dtypes)]
        block_rows = rows_within(budget // 4, V * operands[0].acc.itemsize * block_fn.buffers, group_rows)
        wanted = (any(needs), any(ref_needs))
        blocks = []

        def work(group: slice, chunks: list) -> list:
            formed = [False, False]
            for rows in slices(0, group.stop - group.start, block_rows):
                z, r = (op.block_logits(chunk[rows]) for op, chunk in zip(operands, chunks))
                block = block_fn(slice(group.start + rows.start, group.start + rows.stop), z, r)
                for i, d in enumerate((block.dz, block.dr)):
                    if d is not None and wanted[i]:
                        operands[i].keep(group, rows, d)
                        formed[i] = True
                blocks.append(block._replace(dz=None, dr=None))
            return formed

        run(operands, work)
        return PairResult(blocks, operands[0].result(), operands[1].result())
