"""The SFTKey dilution experiment (examples/sftkey_dilution.py): its task, its arms' token
weights, its grading and statistics, a smoke run of the script, and its committed results."""
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import sftkey_dilution as dilution  # noqa: E402

from sftkey.methods import keys  # noqa: E402

TINY = ["--train", "200", "--val", "20", "--test", "30", "--chain-length", "6", "--stage1-max-steps", "6",
        "--stage1-check", "2", "--stage2-steps", "2", "--lrs", "1e-3", "3e-3", "--batch-size", "8",
        "--hidden", "16", "--layers", "1"]


@pytest.fixture(scope="module")
def problems():
    return {c: dilution.make_problems(2000, seed=3, condition=c) for c in dilution.CONDITIONS}


def test_problem_layout_and_table(problems):
    table = {}
    for p in problems["random"]:
        a, b = p["operands"]
        q, colon, pa, pb, start = p["prompt"].split()
        assert (q, colon, pa, pb) == ("Q", ":", str(a), str(b)) and start in dilution.FILLERS
        assert p["response"] == f"{p['chain']}\n#### {p['answer']}"
        words = p["chain"].split()
        assert len(words) == 43 and words[-3:] == ["=", str(a), str(b)]
        assert all(w in dilution.FILLERS for w in words[:-3])
        assert table.setdefault((a, b), p["answer"]) == p["answer"]  # one answer per pair: a table
    assert len(table) == 100 and len(set(table.values())) == 10


def test_conditions_differ_only_in_the_fillers(problems):
    random, fixed = problems["random"], problems["deterministic"]
    for r, d in zip(random, fixed):
        assert (r["prompt"], r["operands"], r["answer"]) == (d["prompt"], d["operands"], d["answer"])
        start = dilution.FILLERS.index(d["prompt"].split()[-1])
        assert d["chain"].split()[:-3] == [dilution.FILLERS[(start + 1 + i) % 16] for i in range(40)]
    assert sum(r["chain"] != d["chain"] for r, d in zip(random, fixed)) == len(random)


def test_random_fillers_carry_irreducible_loss(problems):
    """Random fillers: uniform over 16 words, each word followed by any other (so ln 16 nats a
    filler); deterministic fillers: each word has one successor (no loss left to learn)."""
    def successors(condition):
        following = {}
        for p in problems[condition]:
            words = [p["prompt"].split()[-1]] + p["chain"].split()[:-3]
            for w, nxt in zip(words, words[1:]):
                following.setdefault(w, set()).add(nxt)
        return following
    assert all(len(s) == 16 for s in successors("random").values())
    assert all(len(s) == 1 for s in successors("deterministic").values())
    counts = Counter(w for p in problems["random"] for w in p["chain"].split()[:-3])
    assert len(counts) == 16 and max(counts.values()) < 1.1 * min(counts.values())
    fresh = dilution.make_problems(10, seed=3, condition="random", chain_length=5)
    assert fresh == dilution.make_problems(10, seed=3, condition="random", chain_length=5)
    assert fresh != dilution.make_problems(10, seed=4, condition="random", chain_length=5)
    with pytest.raises(ValueError, match="condition"):
        dilution.make_problems(1, seed=0, condition="noisy")


def test_arm_token_weights(problems):
    tokenizer = dilution.build_tokenizer([dilution.VOCABULARY])
    chosen = problems["random"][:50]
    features = dilution.arm_features(tokenizer, chosen, cot_weight=0.1)
    eos = tokenizer.eos_token_id
    for i, p in enumerate(chosen):
        ids = features["SFT"][i]["input_ids"]
        assert all(features[arm][i]["input_ids"] == ids for arm in dilution.ARMS)  # the same sequences
        response = tokenizer(p["response"])["input_ids"] + [eos]
        assert ids[-len(response):] == response
        key = tokenizer.convert_tokens_to_ids(["####", str(p["answer"])]) + [eos]
        prompt = [0.0] * (len(ids) - len(response))
        chain = [1.0] * (len(response) - 3)
        assert features["SFT"][i]["token_weights"] == prompt + chain + [1.0] * 3
        assert features["key-only"][i]["token_weights"] == prompt + [0.0] * len(chain) + [1.0] * 3
        assert features["blend"][i]["token_weights"] == prompt + [0.1] * len(chain) + [1.0] * 3
        assert [t for t in features["key-only"][i]["labels"] if t != keys.IGNORE_INDEX] == key
    digits, _ = keys.build_features(tokenizer, [{"prompt": p["prompt"], "response": p["response"]} for p in chosen],
                                    **dilution.DIGIT)
    for f, p in zip(digits, chosen):
        assert [t for t in f["labels"] if t != keys.IGNORE_INDEX] == tokenizer.convert_tokens_to_ids([str(p["answer"])])


def test_grade_is_format_gated():
    p = dilution.make_problems(1, seed=0, condition="random", chain_length=4)[0]
    right = p["chain"].split() + ["####", str(p["answer"]), "</s>", "<pad>"]
    wrong = str((p["answer"] + 1) % 10)
    assert dilution.grade(right, "</s>", p) == {"format": True, "answer": True, "chain": True}
    assert dilution.grade(right[:-2], "</s>", p) == {"format": False, "answer": False, "chain": False}  # no EOS
    assert dilution.grade(["####"] + right, "</s>", p)["format"] is False  # two answer lines
    assert dilution.grade(right[:-3] + [wrong, "</s>"], "</s>", p) == {"format": True, "answer": False, "chain": True}
    other_fillers = ["so"] * 4 + right[4:]
    assert dilution.grade(other_fillers, "</s>", p) == {"format": True, "answer": True, "chain": True}
    assert dilution.grade(right[1:], "</s>", p)["chain"] is False  # one filler short
    operand = right[:-5] + [str((int(right[-5]) + 1) % 10)] + right[-4:]
    assert dilution.grade(operand, "</s>", p) == {"format": True, "answer": True, "chain": False}
    assert dilution.grade(["####", "</s>"], "</s>", p)["format"] is False


def _run(seed, condition, accuracies):
    """A run record with the given test answer accuracies of stage 1, SFT, key-only, blend."""
    metrics = lambda a: {"format_rate": 1.0, "answer_accuracy": a, "chain_accuracy": 1.0, "answer_loss": 1.0}
    record = {"seed": seed, "condition": condition, "stage 1": {"steps": 100, "test": metrics(accuracies[0])}}
    for arm, a in zip(dilution.ARMS, accuracies[1:]):
        record[arm] = {"lr": 1e-3, "test": metrics(a)}
    return record


def test_summary_contrasts_are_paired_by_seed():
    runs = [_run(0, "random", (0.3, 0.4, 0.2, 0.5)), _run(1, "random", (0.5, 0.6, 0.6, 0.9)),
            _run(2, "random", (0.1, 0.2, 0.3, 0.1)), _run(0, "deterministic", (0.3, 0.4, 0.4, 0.4))]
    summary = dilution.summarize(runs)
    assert list(summary) == ["random", "deterministic", dilution.BETWEEN]
    between = summary[dilution.BETWEEN]["contrasts"]["blend - SFT"]
    assert between["seeds"] == [0] and between["differences"] == pytest.approx([0.1 - 0.0])
    assert list(dilution.summarize(runs[:3])) == ["random"]
    blend = summary["random"]["contrasts"]["blend - SFT"]
    assert blend["differences"] == pytest.approx([0.1, 0.3, -0.1]) and blend["mean"] == pytest.approx(0.1)
    assert (blend["above"], blend["below"], blend["level"]) == (2, 1, 0)
    assert -0.1 - 1e-9 <= blend["ci95"][0] < 0.1 < blend["ci95"][1] <= 0.3 + 1e-9
    key = summary["random"]["contrasts"]["key-only - SFT"]
    assert (key["above"], key["below"], key["level"]) == (1, 1, 1)
    assert summary["deterministic"]["contrasts"]["blend - SFT"]["ci95"] == (0.0, 0.0)
    sft = summary["random"]["settings"]["SFT"]["answer_accuracy"]
    assert sft["mean"] == pytest.approx(0.4) and sft["std"] == pytest.approx(0.2)
    assert summary["random"]["settings"]["blend"]["lr"] == [1e-3] * 3
    assert dilution.bootstrap_ci([0.2, 0.2]) == (pytest.approx(0.2), pytest.approx(0.2))
    low, high = dilution.bootstrap_ci(list(range(10)))
    assert 1.5 < low < 4.5 < high < 7.5


def _check_structure(out, seeds, lrs):
    assert sorted((r["seed"], r["condition"]) for r in out["runs"]) == sorted(
        (s, c) for s in seeds for c in dilution.CONDITIONS)
    metrics = ["format_rate", "answer_accuracy", "chain_accuracy", "answer_loss"]
    for r in out["runs"]:
        stage1 = r["stage 1"]
        for split in ("val", "test"):
            assert list(stage1[split]) == metrics
        # stage 1 stops at the first check at the target, else at the last step
        steps, accuracies = zip(*stage1["checks"])
        target, every = out["config"]["stage1_target"], out["config"]["stage1_check"]
        assert list(steps) == list(range(every, stage1["steps"] + 1, every))
        assert all(a < target for a in accuracies[:-1]) and accuracies[-1] == stage1["val"]["answer_accuracy"]
        assert stage1["reached"] == (accuracies[-1] >= target)
        assert stage1["reached"] or stage1["steps"] == out["config"]["stage1_max_steps"]
        for arm in dilution.ARMS:
            assert [run["lr"] for run in r[arm]["by_lr"]] == lrs and r[arm]["lr"] in lrs
            best = max(run["val"]["answer_accuracy"] for run in r[arm]["by_lr"])
            chosen = next(run for run in r[arm]["by_lr"] if run["lr"] == r[arm]["lr"])
            assert chosen["val"]["answer_accuracy"] == best and chosen is next(
                run for run in r[arm]["by_lr"] if run["val"]["answer_accuracy"] == best)
            for m in [r[arm]["test"]] + [run["val"] for run in r[arm]["by_lr"]]:
                assert list(m) == metrics
                assert 0 <= m["answer_accuracy"] <= m["format_rate"] <= 1 and m["chain_accuracy"] <= m["format_rate"]
                assert m["answer_loss"] > 0
    assert list(out["summary"]) == [*dilution.CONDITIONS, dilution.BETWEEN]
    for condition in dilution.CONDITIONS:
        s = out["summary"][condition]
        assert list(s["settings"]) == ["stage 1", *dilution.ARMS]
        assert list(s["contrasts"]) == ["blend - SFT", "key-only - SFT"]
        rows = sorted((r for r in out["runs"] if r["condition"] == condition), key=lambda r: r["seed"])
        for arm in dilution.CONTRASTS:
            c = s["contrasts"][f"{arm} - SFT"]
            assert c["seeds"] == sorted(seeds) and c["above"] + c["below"] + c["level"] == len(seeds)
            assert c["differences"] == [r[arm]["test"]["answer_accuracy"] - r["SFT"]["test"]["answer_accuracy"]
                                        for r in rows]
            assert c["ci95"][0] <= c["mean"] <= c["ci95"][1]
    for arm in dilution.CONTRASTS:
        name = f"{arm} - SFT"
        between = out["summary"][dilution.BETWEEN]["contrasts"][name]
        random_, fixed = (out["summary"][c]["contrasts"][name]["differences"] for c in dilution.CONDITIONS)
        assert between["differences"] == pytest.approx([r - d for r, d in zip(random_, fixed)])


def test_stage1_stops_at_the_first_check_that_reaches_the_target():
    from transformers import TrainerControl, TrainerState
    accuracies = iter([0.1, 0.29, 0.35, 0.5])
    stop = dilution.StopAtAccuracy(lambda: {"answer_accuracy": next(accuracies)}, every=50, target=0.3)
    state, control = TrainerState(), TrainerControl()
    for state.global_step in range(1, 1000):
        stop.on_step_end(None, state, control)
        if control.should_training_stop:
            break
    assert state.global_step == 150 and [step for step, _ in stop.checks] == [50, 100, 150]
    # in the trainer: a target of 0 stops stage 1 at its first check
    out = dilution.main(["--seeds", "0", *TINY, "--conditions", "deterministic", "--stage1-target", "0",
                         "--jobs", "1"])
    assert out["runs"][0]["stage 1"]["steps"] == 2 and out["runs"][0]["stage 1"]["reached"]


def test_script_smoke_run(tmp_path, capsys):
    """The script's main on tiny settings, its tasks in two worker processes (``--jobs 2``)."""
    out_path = tmp_path / "results.json"
    returned = dilution.main(["--seeds", "0", "1", *TINY, "--jobs", "2", "--json", str(out_path)])
    printed = capsys.readouterr().out
    out = json.loads(out_path.read_text())
    assert out == json.loads(json.dumps(returned))
    _check_structure(out, [0, 1], [1e-3, 3e-3])
    assert out["chain_nats"] == {"random": pytest.approx(6 * math.log(16)), "deterministic": 0.0}
    assert dilution.tables(out["summary"]) in printed and dilution.per_seed_table(out["runs"]) in printed
    # a task's result is the same in a worker process as after another task in this one
    alone = dilution.main(["--seeds", "0", "1", *TINY, "--conditions", "random", "--jobs", "1"])["runs"]
    in_pool = [r for r in out["runs"] if r["condition"] == "random"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")}
    assert [strip(r) for r in alone] == [strip(r) for r in in_pool]


def test_committed_results_are_the_readme_table():
    """examples/sftkey_dilution.json is a run of the script's defaults on the 10 seeds, its
    summary is the one its runs give, and examples/README.md shows its tables verbatim."""
    out = json.loads((EXAMPLES / "sftkey_dilution.json").read_text())
    defaults = vars(dilution.parse_args([]))
    assert {k: v for k, v in out["config"].items() if k not in ("jobs", "json")} == {
        k: v for k, v in defaults.items() if k not in ("jobs", "json")}
    _check_structure(out, list(range(10)), defaults["lrs"])
    assert out["summary"] == json.loads(json.dumps(dilution.summarize(out["runs"])))
    readme = (EXAMPLES / "README.md").read_text()
    assert dilution.tables(out["summary"]) in readme
    assert dilution.per_seed_table(out["runs"]) in readme
    assert re.search(rf"{out['seconds'] / 60:.1f} minutes", readme)
