"""Smoke tests: the examples of the critical-token search and of SED-SFT's threshold run, on
small settings, and their results hold what the examples claim."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_critical_tokens_example(tmp_path):
    out = _example("critical_tokens").main(["--problems", "6", "--output", str(tmp_path / "c.jsonl")])
    assert out["examples"] == 6 and out["correct"] == 5          # the first has a wrong reference
    for rule in ("any", "all"):
        assert (out[rule]["precision"], out[rule]["recall"]) == (1.0, 1.0)
    assert out["any"]["critical_share"] > out["all"]["critical_share"] > 0
    assert out["rollouts"] == 2 * out["tried"] > 0
    assert out["unanswered"] == 4 * out["correct"]               # a broken <Answer> or </Answer>, 2 ranks each
    assert out["cft_loss"] > 0


def test_critical_tokens_example_with_a_position_budget(tmp_path):
    out = _example("critical_tokens").main(["--problems", "4", "--positions", "3", "--start", "2",
                                            "--output", str(tmp_path / "c.jsonl")])
    assert out["tried"] == 3 * out["correct"] and out["rollouts"] == 2 * out["tried"]
    assert (out["any"]["precision"], out["any"]["recall"]) == (1.0, 1.0)


def test_sed_threshold_example():
    out = _example("sed_threshold").main(["--warmup-steps", "3", "--sed-steps", "1"])
    assert out["sed_triton"]["tau"] == 0.95
    for name in ("trainer", "paper_script", "consistent"):
        assert 0 < out[name]["tau"] <= 1
    # calibrated with the gate's own k on the trained tokens: the share gated is the quantile
    assert out["consistent"]["gated_share"] == pytest.approx(0.3, abs=0.02)
    assert out["sed_loss"] > 0
