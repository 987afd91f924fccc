"""The SFTKey multi-step experiment (examples/sftkey_multistep.py): its task generator, its
grading, and a smoke run of the script on a budget of seconds (the full run is not for CI)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import sftkey_multistep as multistep  # noqa: E402

from sftkey.methods import keys  # noqa: E402


@pytest.fixture(scope="module")
def problems():
    return multistep.make_problems(500, seed=3)


def _chain_values(p: dict) -> list[int]:
    """Re-derive each step's value from the chain text, checking the step against the prompt."""
    labelled = p["prompt"].removeprefix("Q : ").split()
    values = []
    for i, step in enumerate(p["chain"].rstrip(" ,").split(" , ")):
        label, digit, eq, value = step.split()
        assert [label, digit] == labelled[2 * i:2 * i + 2] and label == multistep.LABELS[i] and eq == "="
        assert int(value) == (3 * int(digit) + 1) % 10
        values.append(int(value))
    assert len(labelled) == 2 * len(values)
    return values


def test_answer_is_first_plus_last_intermediate_mod_10(problems):
    for p in problems:
        values = _chain_values(p)
        assert values == p["values"] and len(values) == 10
        assert p["answer"] == (values[0] + values[-1]) % 10
        assert p["response"] == f"{p['chain']}\n#### {p['answer']}"
    assert sorted(multistep.step_rule(d) for d in range(10)) == list(range(10))


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
    digits, _ = keys.build_features(tokenizer, examples, stage=2, **multistep.DIGIT_OPTIONS)
    for f, p in zip(digits, problems):
        assert [t for t in f["labels"] if t != keys.IGNORE_INDEX] == tokenizer.convert_tokens_to_ids([str(p["answer"])])
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
    other = right[:1] + [str((int(right[1]) + 1) % 10)] + right[2:]
    assert multistep.grade(other, "</s>", p) == {"format": True, "answer": True, "chain": False}
    assert multistep.grade(["####", "</s>"], "</s>", p)["format"] is False


def test_summarize_mean_and_spread():
    given = ((0.2, None), (0.4, 0.5), (0.9, None))
    runs = {s: {"results": {"SFT": {"answer_accuracy": a, "answer_given_chain": g, "chain_accuracy": None}}}
            for s, (a, g) in enumerate(given)}
    summary = multistep.summarize(runs)["SFT"]
    accuracy = summary["answer_accuracy"]
    assert accuracy["mean"] == pytest.approx(0.5)
    assert accuracy["std"] == pytest.approx(0.3605551, rel=1e-6)
    assert (accuracy["min"], accuracy["max"]) == (0.2, 0.9)
    assert summary["answer_given_chain"] == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5}
    assert summary["chain_accuracy"] is None
    assert multistep.table({"SFT": summary}).splitlines()[2] == "| SFT | 0.500 ± 0.361 | 0.500 ± 0.000 | - |"


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "sftkey_multistep.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_script_smoke_run(tmp_path):
    tiny = ["--train", "64", "--eval", "8", "--stage1-steps", "3", "--stage2-steps", "2", "--batch-size", "8",
            "--hidden", "16", "--layers", "1", "--min-steps", "2", "--max-steps", "3"]
    out, alone = tmp_path / "results.json", tmp_path / "seed1.json"
    proc = _run_script("--seeds", "0", "1", *tiny, "--jobs", "1", "--json", str(out))
    result = json.loads(out.read_text())
    settings = ["stage 1", "SFT", "SFTKey key-only", "SFTKey blend 0.1"]
    metrics = ["format_rate", "answer_accuracy", "chain_accuracy", "answer_given_chain", "answer_loss"]
    assert sorted(result["runs"]) == ["0", "1"]
    for run in result["runs"].values():
        assert list(run["results"]) == settings
        for values in run["results"].values():
            assert list(values) == metrics
            assert 0 <= values["answer_accuracy"] <= values["format_rate"] <= 1
            assert values["chain_accuracy"] <= values["format_rate"] and values["answer_loss"] > 0
        assert 0 < run["shares"]["answer_digit"] < run["shares"]["key"] < 1
    assert list(result["summary"]) == settings
    for setting in settings:
        for metric in ("format_rate", "answer_accuracy", "chain_accuracy", "answer_loss"):
            s = result["summary"][setting][metric]
            assert s["min"] <= s["mean"] <= s["max"] and s["std"] >= 0
    assert "| SFTKey key-only |" in proc.stdout

    # a seed gives the same result after another seed in its process as alone in a fresh one
    _run_script("--seeds", "1", *tiny, "--json", str(alone))
    assert json.loads(alone.read_text())["runs"]["1"] == result["runs"]["1"]
