"""How the torch backend forms its products: the dtype decision (native or float32 from
bf16/fp16), and the equivalent layouts of each product with the tuner that picks one."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftkey import config, set_lowp_products
from sftkey.backends import products

from conftest import assert_close


@pytest.fixture
def fresh_probe(monkeypatch):
    """A clean cache of the native-or-not decision, restored afterwards."""
    products._native.cache_clear()
    yield
    products._native.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_modes_decide_the_product_dtype(dtype, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(config, "lowp_products", "float32")
    assert products.product_dtype(cpu, dtype) == torch.float32
    monkeypatch.setattr(config, "lowp_products", "native")
    assert products.product_dtype(cpu, dtype) == dtype
    monkeypatch.setattr(config, "lowp_products", "auto")
    assert products.product_dtype(cpu, dtype) == (dtype if products.lowp_native_on_cpu(dtype) else torch.float32)
    assert products.product_dtype(torch.device("cuda"), dtype) == dtype  # cuBLAS: native
    for other in (torch.float32, torch.float64):
        assert products.product_dtype(cpu, other) == other


def test_emulated_products_are_not_native(fresh_probe, monkeypatch):
    """No oneDNN path, or a probe far below the float32 rate (an AVX2-only CPU): float32 products."""
    monkeypatch.setattr(products, "onednn_supports", lambda dtype: False)
    monkeypatch.setattr(products, "native_isa", lambda dtype: True)
    assert not products.lowp_native_on_cpu(torch.bfloat16)
    products._native.cache_clear()
    monkeypatch.setattr(products, "onednn_supports", lambda dtype: True)
    monkeypatch.setattr(products, "native_isa", lambda dtype: False)
    rates = {torch.bfloat16: 3e9, torch.float16: 30e9, torch.float32: 40e9}
    monkeypatch.setattr(products, "_rates", lambda dtypes: {dt: rates[dt] for dt in dtypes})
    assert not products.lowp_native_on_cpu(torch.bfloat16)
    assert products.lowp_native_on_cpu(torch.float16)  # at par with float32 counts as native


def test_native_instructions_need_no_probe(fresh_probe, monkeypatch):
    """With the dtype's instructions (AVX512-BF16, AMX), native without a timing."""
    def no_probe(dtypes):
        raise AssertionError("timed although the CPU has the instructions")
    monkeypatch.setattr(products, "onednn_supports", lambda dtype: True)
    monkeypatch.setattr(products, "_rates", no_probe)
    monkeypatch.setattr(products, "native_isa", lambda dtype: True)
    assert products.lowp_native_on_cpu(torch.bfloat16) and products.lowp_native_on_cpu(torch.float16)
    monkeypatch.setattr(products, "native_isa", lambda dtype: False)
    products._native.cache_clear()
    with pytest.raises(AssertionError, match="timed"):
        products.lowp_native_on_cpu(torch.bfloat16)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from /proc/cpuinfo")
def test_native_isa_reads_this_cpu():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    if "avx512_bf16" in flags:
        assert products.native_isa(torch.bfloat16)
    if not flags & {"avx512_bf16", "amx_bf16", "amx_tile"}:
        assert not products.native_isa(torch.bfloat16)
    if not flags & {"amx_fp16", "amx_tile"}:
        assert not products.native_isa(torch.float16)


def test_probe_times_real_products(fresh_probe):
    rates = products._rates((torch.bfloat16, torch.float32))
    assert all(1e7 < r < 1e14 for r in rates.values()), rates


def test_describe_names_each_choice():
    info = products.describe(torch.device("cpu"))
    assert info["bfloat16_products"] in ("bfloat16", "float32")
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_set_lowp_products_checks_its_argument(monkeypatch):
    monkeypatch.setattr(config, "lowp_products", "auto")
    with pytest.raises(ValueError, match="mode must be one of"):
        set_lowp_products("fp32")
    set_lowp_products("float32")
    assert config.lowp_products == "float32"


def test_environment_variable_is_checked():
    result = subprocess.run([sys.executable, "-c", "import sftkey"], capture_output=True, text=True,
                            env={"SFTKEY_LOWP_PRODUCTS": "bf16", "PATH": ""})
    assert result.returncode != 0 and "SFTKEY_LOWP_PRODUCTS must be one of" in result.stderr


def _operands(kind: str, rows: int, g: torch.Generator):
    """``(a, b)`` laid out as the backend passes them: logits ``x @ W^T``, dX ``dz @ W``, dW ``dz^T @ x``."""
    d, v = 24, 37
    x, w, dz = torch.randn(rows, d, generator=g), torch.randn(v, d, generator=g), torch.randn(rows, v, generator=g)
    return {"logits": (x, w.t()), "dx": (dz, w), "dw": (dz.t(), x)}[kind]


KINDS = {"logits": products.LOGITS, "dx": products.DX, "dw": products.DW}


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("rows", [1, 63, 64, 100, 129])
@pytest.mark.parametrize("kind", KINDS)
def test_every_way_forms_the_product(kind, rows, accumulate):
    g = torch.Generator().manual_seed(rows)
    a, b = _operands(kind, rows, g)
    start = torch.randn(a.shape[0], b.shape[1], generator=g)
    want = a.double() @ b.double() + (start.double() if accumulate else 0)
    for i, way in enumerate(KINDS[kind].ways):
        out = start.clone() if accumulate else torch.full_like(start, float("nan"))
        way(a, b, out, accumulate)
        assert_close(out, want, torch.float32, f"{kind} way {i}, {rows} rows")


def _slow(a, b, out, accumulate):
    time.sleep(0.005)
    products._plain(a, b, out, accumulate)


def _counted(way, calls: list, name: str):
    def run(a, b, out, accumulate):
        calls.append(name)
        way(a, b, out, accumulate)
    return run


@pytest.fixture
def tuned(monkeypatch):
    """Tuning on, for products of any size."""
    monkeypatch.setattr(config, "tune_products", True)
    monkeypatch.setattr(products, "TUNED_FLOP", 0)


def test_tuner_tries_each_way_across_calls_then_keeps_the_fastest(tuned):
    """Every call forms its product once (no extra products on a first call): each way once,
    a slow one not again, the close ones up to ``ROUNDS`` times; then the fastest for good."""
    calls = []
    ways = products.Ways(_counted(_slow, calls, "slow"), _counted(products._plain, calls, "plain"),
                         _counted(products._plain, calls, "plain too"))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(8, 3, generator=g)
    for i in range(8):
        out = torch.full((5, 3), float("nan"))
        ways(a, b, out)
        assert len(calls) == i + 1
        assert_close(out, a.double() @ b.double(), torch.float32, f"call {i}")
    assert calls[:3] == ["slow", "plain", "plain too"] and calls.count("slow") == 1
    assert ways.chosen and not ways.timings and list(ways.chosen.values())[0] in (1, 2)
    assert len(set(calls[5:])) == 1


def test_tuner_shares_a_choice_within_a_size_class(tuned):
    """Groups whose row counts round up to the same power of two share the choice (the last
    group of every step has a new row count); another class is tuned on its own."""
    ways = products.Ways(_slow, products._plain)
    b = torch.randn(8, 3)
    for rows in (33, 40, 64, 50):
        ways(torch.randn(rows, 8), b, torch.empty(rows, 3))
    assert len(ways.chosen) == 1 and not ways.timings
    ways(torch.randn(20, 8), b, torch.empty(20, 3))
    assert len(ways.chosen) == 1 and len(ways.timings) == 1


def test_small_products_are_not_tuned(monkeypatch):
    """Below ``TUNED_FLOP`` every call takes the first way: bitwise repeatable (gradcheck's
    reentrance check)."""
    monkeypatch.setattr(config, "tune_products", True)
    calls = []
    ways = products.Ways(_counted(products._plain, calls, "first"), _counted(_slow, calls, "second"))
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    assert 2 * a.numel() * b.shape[1] < products.TUNED_FLOP
    for _ in range(5):
        ways(a, b, torch.empty(4, 3))
    assert calls == ["first"] * 5 and not ways.chosen and not ways.timings


def test_tuner_off_uses_the_first_way(monkeypatch):
    calls = []
    ways = products.Ways(_counted(products._plain, calls, "first"), products._plain)
    monkeypatch.setattr(config, "tune_products", False)
    monkeypatch.setattr(products, "TUNED_FLOP", 0)
    a, b, out = torch.ones(2, 3), torch.ones(3, 2), torch.zeros(2, 2)
    ways(a, b, out, accumulate=True)
    ways(a, b, out)
    assert calls == ["first", "first"] and not ways.chosen and torch.equal(out, torch.full((2, 2), 3.0))
