"""The SFTKey multi-step experiment (examples/sftkey_multistep.py): its task generator, its
grading, and a smoke run of the script on a budget of seconds (the full run is not for CI)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import sftkey_multistep as multistep  # noqa: E402

from sftkey import keys  # noqa: E402


@pytest.fixture(scope="module")
def problems():
    return multistep.make_problems(500, seed=3)


def _chain_values(chain: str) -> list[int]:
    """Re-derive each step's result from the chain text, checking every step's arithmetic."""
    values = []
    for label, step in zip(multistep.LABELS, chain.rstrip(" ,").split(" , ")):
        a, step_label, op, n, eq, result = step.split()
        assert step_label == label and eq == "=" and op in "+-"
        assert int(result) == (int(a) + int(n) if op == "+" else int(a) - int(n)) % 10
        assert not values or int(a) == values[-1]
        values.append(int(result))
    return values


def test_answer_is_first_plus_last_intermediate_mod_10(problems):
    for p in problems:
        values = _chain_values(p["chain"])
        assert values == p["values"]
        assert p["answer"] == (values[0] + values[-1]) % 10
        assert p["response"] == f"{p['chain']}\n#### {p['answer']}"
        start, *ops = p["prompt"].split(" ( mod 10 )")[0].removeprefix("Q : ").split(" ")
        assert len(values) == 10 and len(ops) == 3 * len(values)
        steps = p["chain"].split(" , ")
        for i, step in enumerate(steps):  # each step's labelled operation is the prompt's
            assert step.split()[1:4] == ops[3 * i:3 * i + 3]
        assert steps[0].split()[0] == start


def test_answer_is_not_a_copy_of_the_last_chain_value(problems):
    copies = sum(p["answer"] == p["values"][-1] for p in problems)
    # the answer equals the last value only when the first is 0: about 1 in 10
    assert copies == sum(p["values"][0] == 0 for p in problems)
    assert copies < 0.2 * len(problems)
    assert len({p["answer"] for p in problems}) == 10


def test_steps_range_and_seed():
    a = multistep.make_problems(50, seed=5, min_steps=2, max_steps=3)
    assert a == multistep.make_problems(50, seed=5, min_steps=2, max_steps=3)
    assert a != multistep.make_problems(50, seed=6, min_steps=2, max_steps=3)
    assert {len(p["values"]) for p in a} == {2, 3}
    assert multistep.answer_of([4, 1, 9]) == 3


def test_key_tokens_are_a_small_share_and_cover_the_answer_line(problems):
    tokenizer = multistep.build_tokenizer([p["prompt"] + p["response"] for p in problems])
    examples = [{"prompt": p["prompt"], "response": p["response"]} for p in problems]
    all_tokens, _ = keys.build_features(tokenizer, examples, stage=1)
    key_only, report = keys.build_features(tokenizer, examples, stage=2, **multistep.KEY_OPTIONS)
    assert report.kept == len(problems)
    for f, p in zip(key_only, problems):
        trained = tokenizer.convert_ids_to_tokens([t for t in f["labels"] if t != keys.IGNORE_INDEX])
        assert trained == ["####", str(p["answer"]), tokenizer.eos_token]
    shares = multistep.token_shares(all_tokens, key_only)
    chain_tokens = sum(len(p["chain"].split()) for p in problems)
    assert shares["answer_digit"] == pytest.approx(len(problems) / (chain_tokens + 3 * len(problems)))
    assert shares["key"] == pytest.approx(3 * shares["answer_digit"])
    assert shares["answer_digit"] < 0.025


def test_grade_requires_the_format():
    p = multistep.make_problems(1, seed=0)[0]
    right = p["chain"].split() + ["####", str(p["answer"]), "</s>", "<pad>"]
    wrong = str((p["answer"] + 1) % 10)
    assert multistep.grade(right, "</s>", p) == {"format": True, "answer": True, "chain": True}
    assert multistep.grade(right[:-2], "</s>", p) == {"format": False, "answer": False, "chain": False}
    assert multistep.grade(["####"] + right, "</s>", p)["format"] is False
    assert multistep.grade(right[:-3] + [wrong, "</s>"], "</s>", p) == {"format": True, "answer": False, "chain": True}
    other = [str((int(right[0]) + 1) % 10)] + right[1:]
    assert multistep.grade(other, "</s>", p) == {"format": True, "answer": True, "chain": False}
    assert multistep.grade(["####", "</s>"], "</s>", p)["format"] is False


def test_summarize_mean_and_spread():
    runs = {s: {"results": {"SFT": {"answer_accuracy": a}}} for s, a in enumerate((0.2, 0.4, 0.9))}
    summary = multistep.summarize(runs)["SFT"]["answer_accuracy"]
    assert summary["mean"] == pytest.approx(0.5)
    assert summary["std"] == pytest.approx(0.3605551, rel=1e-6)
    assert (summary["min"], summary["max"]) == (0.2, 0.9)


def test_script_smoke_run(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "sftkey_multistep.py"), "--seeds", "0", "1", "--train", "64", "--eval", "8",
         "--stage1-steps", "3", "--stage2-steps", "2", "--batch-size", "8", "--hidden", "16", "--layers", "1",
         "--min-steps", "2", "--max-steps", "3", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    settings = ["stage 1", "SFT", "SFTKey key-only", "SFTKey blend 0.1"]
    metrics = ["format_rate", "answer_accuracy", "chain_accuracy", "answer_given_chain"]
    assert sorted(result["runs"]) == ["0", "1"]
    for run in result["runs"].values():
        assert list(run["results"]) == settings
        for values in run["results"].values():
            assert list(values) == metrics
            assert 0 <= values["answer_accuracy"] <= values["format_rate"] <= 1
            assert values["chain_accuracy"] <= values["format_rate"]
        assert 0 < run["shares"]["answer_digit"] < run["shares"]["key"] < 1
    assert list(result["summary"]) == settings
    for setting in settings:
        for metric in ("format_rate", "answer_accuracy", "chain_accuracy"):
            s = result["summary"][setting][metric]
            assert s["min"] <= s["mean"] <= s["max"] and s["std"] >= 0
    assert "| SFTKey key-only |" in proc.stdout
