"""Regression timings of sftkey's backends at small shapes, with pytest-benchmark:
``pytest bench/ --benchmark-only`` (compare runs with ``--benchmark-autosave`` and
``--benchmark-compare``). Not part of the default test run, whose testpaths is ``tests/``.
Each benchmark first checks its result against the float64 reference."""
from itertools import cycle

import pytest
import torch

from bench.cases import Case, Options, input_sets
from bench.measure import make_step
from bench.peers import IMPLS
from bench.verify import errors, passes, reference

CASES = [Case(256, 256, 4096, "bf16"), Case(512, 512, 8192, "bf16"), Case(256, 256, 4096, "fp32")]
OPTIONS = {"plain": Options(), "weighted+entropy": Options(token_weights=True, entropy=0.1)}
TARGETS = [("sftkey-torch", "cpu")] + ([("sftkey-torch", "cuda"), ("sftkey-triton", "cuda")]
                                       if torch.cuda.is_available() else [])


@pytest.mark.parametrize("pass_", ["fwd", "fwd-bwd"])
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
@pytest.mark.parametrize("impl,device", TARGETS)
def test_linear_cross_entropy(benchmark, impl, device, case, opts, pass_):
    device = torch.device(device)
    sets = input_sets(case, opts, device)
    if pass_ == "fwd-bwd":
        for s in sets:
            s.x.requires_grad_()
            s.w.requires_grad_()
    step = make_step(IMPLS[impl].build(opts, device), pass_)
    loss, grads = step(sets[0])
    errs = errors({"loss": loss.detach().cpu(), "grads": [g.cpu() for g in grads]},
                  reference(case, opts, sets[0], pass_))
    assert passes(errs, case.dtype), errs

    rotation = cycle(sets)
    run = step if device.type == "cpu" else lambda inputs: (step(inputs), torch.cuda.synchronize())
    benchmark.extra_info.update(tokens=case.n, flops=case.flops(pass_))
    benchmark.pedantic(run, setup=lambda: ((next(rotation),), {}), rounds=5, warmup_rounds=1)
