"""Every backend against the float64 reference: loss, dX, dW, db, over random combinations
of all options and reductions, odd shapes, every dtype, ignored tokens and zero weights."""
import importlib
import random

import pytest
import torch

import sftkey
from sftkey import config
from sftkey.backends.engine import Needs

from conftest import DEVICE, DTYPES, assert_close, force_ways, make_head

torch_backend = importlib.import_module("sftkey.backends.torch")  # the package's `torch` attribute is the library
engine = importlib.import_module("sftkey.backends.engine")

# (N, D, V): N=1, V prime, D not a power of two, V above one vocabulary slice of the dW products
SHAPES = [(1, 16, 7), (37, 40, 257), (50, 24, 131), (33, 48, 300)]
REDUCTIONS = ("mean", "sum", "none")
SEEDS = range(8)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Groups of 32 rows worked in blocks of 16 (bf16/fp16), and dW staged (and a W of float32
    products up-cast) in slices of tens of vocabulary rows, so group, block and slice edges
    are exercised."""
    monkeypatch.setattr(config, "chunk_budget_bytes", 20000)
    monkeypatch.setattr(engine, "STAGING_BYTES", 8192)
    monkeypatch.setattr(engine, "UPCAST_BYTES", 4096)


def random_options(rng: random.Random, x, w, y, bias):
    """A random subset of every option of the contract."""
    n_shape, V = y.shape, w.shape[0]
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    opts = {"reduction": rng.choice(REDUCTIONS)}
    if bias is not None:
        opts["bias"] = bias
    if rng.random() < 0.5:
        tw = torch.rand(n_shape, generator=g)
        tw[torch.rand(n_shape, generator=g) < 0.2] = 0.0
        opts["token_weights"] = tw.to(DEVICE)
    if rng.random() < 0.4:
        opts["entropy_weights"] = rng.choice([0.1, torch.rand(n_shape, generator=g).to(DEVICE)])
    if rng.random() < 0.4:
        opts["class_weights"] = (torch.rand(V, generator=g) + 0.1).to(DEVICE)
    if rng.random() < 0.4:
        opts["label_smoothing"] = rng.choice([0.05, 0.3])
    if rng.random() < 0.3:
        opts["z_loss"] = 1e-3
    if rng.random() < 0.3:
        opts["softcap"] = rng.choice([2.0, 15.0])
    if rng.random() < 0.3:
        opts["dft"] = True
    if opts["reduction"] == "mean" and rng.random() < 0.2:
        opts["normalizer"] = 7.0
    return opts


def run(x, w, y, opts, backend, grad_seed, return_stats=True):
    """Loss and gradients of ``x, w`` and ``opts['bias']``; for ``reduction='none'`` with a
    random upstream gradient (seeded, so every backend sees the same one). Without
    ``return_stats`` (the single pass then skips the tokens without loss) the stats are None."""
    leaves = [x, w] + ([opts["bias"]] if "bias" in opts else [])
    out = sftkey.linear_cross_entropy(x, w, y, backend=backend, return_stats=return_stats, **opts)
    loss, stats = out if return_stats else (out, None)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad((loss * upstream.to(loss)).sum(), leaves)
    return loss.detach(), grads, stats


def double(opts):
    return {k: (v.detach().double().requires_grad_() if k == "bias" else v) for k, v in opts.items()}


#: Each dtype with its products in that dtype, and bf16/fp16 also with float32 products (as on
#: CPUs where theirs are not native).
PRODUCT_DTYPES = [(d, "native") for d in DTYPES] + [(d, "float32") for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("dtype,lowp_products", PRODUCT_DTYPES, ids=lambda p: str(p))
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_reference(backend, dtype, seed, lowp_products, monkeypatch):
    """Also each way of forming the torch backend's products (one per seed, in turn)."""
    if lowp_products == "float32" and backend != "torch":
        pytest.skip("float32 products of bf16/fp16 inputs are a torch-backend path")
    monkeypatch.setattr(config, "lowp_products", lowp_products)
    force_ways(monkeypatch, seed)
    rng = random.Random(seed * 7919 + DTYPES.index(dtype))
    n, d, v = SHAPES[seed % len(SHAPES)]
    x, w, bias, y = make_head(n, d, v, dtype, seed=seed, bias=rng.random() < 0.5)
    opts = random_options(rng, x, w, y, bias)
    with_stats = rng.random() < 0.5
    got_loss, got_grads, got_stats = run(x, w, y, opts, backend, seed, with_stats)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    want_loss, want_grads, want_stats = run(x64, w64, y, double(opts), "reference", seed)
    what = f"{backend} {dtype} {sorted(opts)} reduction={opts['reduction']}"
    assert_close(got_loss, want_loss, dtype, f"loss {what}")
    for name, got, want in zip(("dX", "dW", "db"), got_grads, want_grads):
        assert got.dtype == dtype, f"{name} dtype {got.dtype} for {dtype} inputs"
        assert_close(got, want, dtype, f"{name} {what}")
    if not with_stats:
        return
    for name in ("lse", "entropy", "target_logprob"):
        assert_close(getattr(got_stats, name), getattr(want_stats, name), dtype, f"stats.{name} {what}")
    if dtype == torch.float32:
        assert torch.equal(got_stats.correct, want_stats.correct)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_exact(backend, reduction):
    """Float64 inputs keep float64 end to end (the torch backend); tight tolerance."""
    if backend.startswith("triton"):
        pytest.skip("the triton backends take float32/bfloat16/float16 inputs")
    x, w, b, y = make_head(29, 36, 211, torch.float64, seed=11, bias=True)
    opts = dict(bias=b, reduction=reduction, label_smoothing=0.1, entropy_weights=0.2, z_loss=1e-2, softcap=4.0,
                class_weights=torch.rand(211, dtype=torch.float64) + 0.5)
    got = run(x, w, y, opts, backend, 3)
    want = run(x, w, y, opts, "reference", 3)
    assert_close(got[0], want[0], torch.float64, "loss")
    for g, r in zip(got[1], want[1]):
        assert_close(g, r, torch.float64, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_dim_targets_and_shift(backend, dtype):
    x, w, _, y = make_head(0, 24, 67, dtype, seed=5, lead=(3, 7))
    tw = torch.rand(3, 7, device=DEVICE)
    opts = dict(token_weights=tw, entropy_weights=0.05, shift=True)
    got_loss, got_grads, _ = run(x, w, y, dict(opts, reduction="none"), backend, 1)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    want_loss, want_grads, _ = run(x64, w64, y, dict(opts, reduction="none"), "reference", 1)
    assert got_loss.shape == (3, 7)
    assert_close(got_loss, want_loss, dtype, "loss")
    for g, r in zip(got_grads, want_grads):
        assert_close(g, r, dtype, "grad")


@pytest.mark.parametrize("lowp_products", config.LOWP_MODES[1:])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("groups", ["one", "several"])
def test_low_precision_dw_one_group_or_float32_sum(dtype, groups, lowp_products, monkeypatch):
    """A bf16/fp16 dW: few rows fit one group within the budget plus the float32 dW buffer's
    4VD bytes (one product, no buffer; native products of 100 rows split at 64, float32 ones
    of 60 rows staged slice by slice); 300 rows do not, and the groups' products are summed in
    the float32 buffer."""
    monkeypatch.setattr(config, "lowp_products", lowp_products)
    n = 300 if groups == "several" else 100 if lowp_products == "native" else 60
    d, v = 48, 131
    x, w, _, y = make_head(n, d, v, dtype, seed=n)
    head = torch_backend.Head(x.detach().reshape(n, d), w.detach(), None, y.clamp_min(-1), None, None)
    rows = torch_backend.operand(head, Needs(True, True, False), torch_backend.product_dtype(head.x.device, dtype),
                                 config.chunk_budget_bytes).group_rows
    assert (rows == n) == (groups == "one"), f"group of {rows} rows for N={n}"
    opts = dict(token_weights=torch.rand(n, generator=torch.Generator().manual_seed(n)).to(DEVICE), z_loss=1e-3)
    got_loss, got_grads, _ = run(x, w, y, dict(opts, reduction="mean"), "torch", 0, return_stats=False)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    want_loss, want_grads, _ = run(x64, w64, y, dict(opts, reduction="mean"), "reference", 0)
    assert_close(got_loss, want_loss, dtype, "loss")
    for name, got, want in zip(("dX", "dW"), got_grads, want_grads):
        assert_close(got, want, dtype, f"{name} N={n}")
