"""sftkey.distributed on gloo (CPU): vocabulary-parallel loss over 2 and 3 ranks with uneven
shards, held to the single-process float64 reference (loss, statistics, dX, each rank's rows
of dW and db), and a DDP run whose gradients equal a single-process run on the whole batch.

Process start-up is most of the cost, so one ``torch.multiprocessing.spawn`` of 3 ranks runs
everything: the 3-rank cases on the default group, the 2-rank cases on the subgroup of global
ranks 1 and 2 (so ``group=`` and group ranks are exercised), and the DDP run. Ranks write
their results to files that the tests compare here."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sftkey
from sftkey import reference
from sftkey.distributed import global_normalizer, vocab_parallel_linear_cross_entropy

from conftest import assert_close

F64 = torch.float64
D, V = 8, 23
WORLD = 3
SHARDS = {2: [9, 14], 3: [5, 11, 7]}  # rows of W per group rank, uneven


def _case_inputs(seed, lead=(13,), bias=False, ignore_index=-100, all_ignored=False, tie=False):
    """Full-vocabulary inputs, the same on every rank (float64)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, D, generator=g, dtype=F64)
    w = torch.randn(V, D, generator=g, dtype=F64) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=F64) * 0.5 if bias else None
    y = torch.randint(0, V, lead, generator=g)
    argmax = (h @ w.T + (0 if b is None else b)).argmax(-1)
    y = torch.where(torch.rand(lead, generator=g) < 0.5, argmax, y)  # make stats.correct informative
    y[torch.rand(lead, generator=g) < 0.3] = ignore_index
    if all_ignored:
        y.fill_(ignore_index)
    if tie:  # rows 3 (first shard) and 20 (last shard) give the largest logit, exactly equal
        h = torch.randint(0, 4, h.shape, generator=g).to(F64)
        w[3] = w[20] = 2.0
        y[::2], y[1::2] = 3, 20
    extra = dict(
        upstream=torch.randn(lead, generator=g, dtype=F64),
        token_weights=torch.rand(lead, generator=g, dtype=F64) + 0.5,
        entropy_weights=torch.rand(lead, generator=g, dtype=F64) * 0.3,
        class_weights=torch.rand(V, generator=g, dtype=F64) + 0.5,
    )
    return h, w, b, y, extra


#: (seed, input kwargs, loss options; "token_weights" etc. set to True take the case's tensor).
CASES = [
    (1, {}, {}),
    (2, dict(bias=True), dict(token_weights=True, reduction="sum")),
    (3, {}, dict(class_weights=True, label_smoothing=0.2)),
    (4, dict(bias=True), dict(entropy_weights=True, z_loss=1e-2, softcap=3.0, reduction="none")),
    (5, {}, dict(dft=True, token_weights=True, return_stats=True)),
    (6, dict(lead=(3, 6), bias=True), dict(shift=True, class_weights=True, label_smoothing=0.1,
                                           entropy_weights=0.05, token_weights=True, return_stats=True)),
    (7, {}, dict(normalizer=7.5, class_weights=True, z_loss=1e-3, softcap=2.0, return_stats=True)),
    (8, dict(all_ignored=True, bias=True), dict(label_smoothing=0.1)),
    (9, dict(ignore_index=5), dict(ignore_index=5, class_weights=True, reduction="none", return_stats=True)),
    (10, dict(tie=True), dict(return_stats=True, label_smoothing=0.05)),
    (11, dict(bias=True), dict(vocab_start="reversed", token_weights=True, dft=True, entropy_weights=0.1)),
]


def _options(extra, options):
    return {k: (extra[k] if k in extra and v is True else v) for k, v in options.items() if k != "vocab_start"}


def _shard(world, rank, reversed_layout=False):
    """``(start, end)`` of this rank's rows; reversed: rank 0 holds the last rows."""
    sizes = SHARDS[world]
    order = list(range(world))[::-1] if reversed_layout else list(range(world))
    start = sum(sizes[r] for r in order[: order.index(rank)])
    return start, start + sizes[rank]


def _vocab_parallel_case(group, seed, inputs, options):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    h, w, b, y, extra = _case_inputs(seed, **inputs)
    reversed_layout = options.get("vocab_start") == "reversed"
    start, end = _shard(world, rank, reversed_layout)
    h.requires_grad_()
    w_r = w[start:end].clone().requires_grad_()
    b_r = None if b is None else b[start:end].clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(h, w_r, y, bias=b_r, group=group,
                                              vocab_start=start if reversed_layout else None,
                                              **_options(extra, options))
    loss, stats = out if options.get("return_stats") else (out, None)
    (loss * extra["upstream"] if loss.dim() else loss).sum().backward()
    return dict(loss=loss.detach(), stats=stats, dx=h.grad, dw=w_r.grad, db=None if b_r is None else b_r.grad,
                rows=(start, end))


class _Tiny(nn.Module):
    """A hidden projection and an LM head whose forward returns the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, D).double()
        self.head = nn.Linear(D, V, bias=False).double()

    def forward(self, x, labels, token_weights, class_weights, normalizer=None):
        return sftkey.linear_cross_entropy(self.proj(x), self.head.weight, labels, shift=True,
                                           token_weights=token_weights, class_weights=class_weights,
                                           normalizer=normalizer)


def _ddp_batch(rank):
    """Rank ``r`` gets ``r + 1`` sequences of 5 tokens; rank 2's labels are all ignored."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(rank + 1, 5, 6, generator=g, dtype=F64)
    labels = torch.randint(0, V, (rank + 1, 5), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.4] = -100
    if rank == 2:
        labels.fill_(-100)
    token_weights = torch.rand(labels.shape, generator=g, dtype=F64) + 0.5
    return x, labels, token_weights


DDP_CLASS_WEIGHTS = torch.linspace(0.5, 1.5, V, dtype=F64)


def _ddp_case(rank):
    model = nn.parallel.DistributedDataParallel(_Tiny())
    x, labels, tw = _ddp_batch(rank)
    norm = global_normalizer(labels, token_weights=tw, class_weights=DDP_CLASS_WEIGHTS, shift=True)
    loss = model(x, labels, tw, DDP_CLASS_WEIGHTS, normalizer=norm)
    loss.backward()
    return dict(loss=loss.detach(), grads={n: p.grad for n, p in model.module.named_parameters()})


def _worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([1, 2])
        results = {3: [_vocab_parallel_case(None, *case) for case in CASES]}
        if rank in (1, 2):
            results[2] = [_vocab_parallel_case(pair, *case) for case in CASES]
        results["ddp"] = _ddp_case(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every global rank's results."""
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(f"file://{out / 'rendezvous'}", str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(seed, inputs, options):
    h, w, b, y, extra = _case_inputs(seed, **inputs)
    leaves = [t.requires_grad_() for t in (h, w, b) if t is not None]
    out = reference.linear_cross_entropy(h, w, y, bias=b, **_options(extra, options))
    loss, stats = out if options.get("return_stats") else (out, None)
    grads = torch.autograd.grad((loss * extra["upstream"] if loss.dim() else loss).sum(), leaves)
    return loss.detach(), stats, grads[0], grads[1], grads[2] if b is not None else None


@pytest.mark.parametrize("world", sorted(SHARDS))
@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c[0]) for c in CASES])
def test_vocab_parallel_matches_reference(ranks, world, case):
    seed, inputs, options = CASES[case]
    loss, stats, dx, dw, db = _reference(seed, inputs, options)
    for rank, res in enumerate(ranks[WORLD - world:]):
        got = res[world][case]
        start, end = got["rows"]
        where = f"world {world} rank {rank}"
        assert_close(got["loss"], loss, F64, f"loss ({where})")
        assert_close(got["dx"], dx, F64, f"dX ({where})")
        assert_close(got["dw"], dw[start:end], F64, f"dW rows {start}:{end} ({where})")
        if db is not None:
            assert_close(got["db"], db[start:end], F64, f"db rows {start}:{end} ({where})")
        if stats is not None:
            for name in ("lse", "entropy", "target_logprob"):
                assert_close(getattr(got["stats"], name), getattr(stats, name), F64, f"stats.{name} ({where})")
            assert torch.equal(got["stats"].correct, stats.correct), f"stats.correct ({where})"


def test_ddp_gradients_equal_the_global_mean(ranks):
    """3 ranks, uneven valid tokens (rank 2 none): the DDP-averaged gradients with
    ``normalizer=global_normalizer(...)`` equal one process's on the concatenated batch."""
    batches = [_ddp_batch(r) for r in range(WORLD)]
    x, labels, tw = (torch.cat(parts) for parts in zip(*batches))
    model = _Tiny()
    loss = model(x, labels, tw, DDP_CLASS_WEIGHTS)
    loss.backward()
    for rank, res in enumerate(ranks):
        for name, p in model.named_parameters():
            assert_close(res["ddp"]["grads"][name], p.grad, F64, f"grad {name} (rank {rank})")
    mean_of_losses = sum(res["ddp"]["loss"] for res in ranks) / WORLD
    assert_close(mean_of_losses, loss.detach(), F64, "mean of the ranks' losses")


def test_single_rank_matches_linear_cross_entropy_and_checks_arguments(single_rank):
    """One rank holding the whole vocabulary is :func:`sftkey.linear_cross_entropy` (bf16:
    gradients in bf16); the distributed arguments are checked."""
    h, w, b, y, extra = _case_inputs(12, bias=True)
    h, w, b = (t.bfloat16().requires_grad_() for t in (h, w, b))
    kw = dict(bias=b, label_smoothing=0.1, token_weights=extra["token_weights"].float())
    got = vocab_parallel_linear_cross_entropy(h, w, y, **kw)
    got_grads = torch.autograd.grad(got, (h, w, b))
    want = sftkey.linear_cross_entropy(h, w, y, **kw)
    want_grads = torch.autograd.grad(want, (h, w, b))
    assert_close(got, want, torch.bfloat16, "loss")
    for g, r, name in zip(got_grads, want_grads, ("dX", "dW", "db")):
        assert g.dtype == torch.bfloat16, name
        assert_close(g, r, torch.bfloat16, name)
    with pytest.raises(ValueError, match="class_weights"):
        vocab_parallel_linear_cross_entropy(h, w, y, class_weights=extra["class_weights"][:5])
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_linear_cross_entropy(h, w[:10], y, vocab_start=14)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_linear_cross_entropy(h, w[:10], y)
    with pytest.raises(ValueError, match="reference"):
        vocab_parallel_linear_cross_entropy(h, w, y, backend="reference")
    with pytest.raises(ValueError, match="token_weights"):
        global_normalizer(y, token_weights=extra["token_weights"][:4])
    assert float(global_normalizer(torch.full((4,), -100))) == 1.0
